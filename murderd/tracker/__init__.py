"""murder-tracker: an HTTP BitTorrent tracker for deploy swarms.

``registry`` holds the state (deploys, peers, selection), ``http`` the aiohttp handlers,
``daemon`` the Service that loads torrents_dir, persists registrations and serves.
"""
