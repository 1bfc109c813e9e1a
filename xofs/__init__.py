"""xofs: a Xen Orchestra server as a file tree, and an XO simulator to mount when there is none."""

__version__ = "0.1.0"
