"""The facility's conventions: the ISIS data archive layout, lastrun.txt, reading ISIS NeXus files."""
