"""murderd: ship deploy artifacts to a fleet over BitTorrent (a rebuild of Twitter's Murder)."""

__version__ = "0.1.0"
