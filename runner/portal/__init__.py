"""The reductions portal: a JupyterHub service listing runs and rerunning them through typed forms.

The tornado app lives in ``runner.portal.app``; parameter defaults it edits are in ``runner.templates.defaults``.
"""
