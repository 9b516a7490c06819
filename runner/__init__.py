"""nbreduce: notebook-first automatic data reduction.

Data flows one way: trigger -> broker -> runner -> archive -> hub.
"""

__version__ = "0.1.0"
