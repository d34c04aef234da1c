"""dgproxy: a delta-compressing S3 proxy on Twisted."""

__version__ = "0.1.0"
TOOL_NAME = "dgproxy/" + __version__
