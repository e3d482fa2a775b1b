"""Benchmark-only: apply libtorrent setting overrides to murderd daemons, for A/B tuning runs.

bench/run.py puts this directory on PYTHONPATH of the daemons it starts when ``--lt-set`` is
given; Python imports ``sitecustomize`` at start-up, before the daemon imports murderd.lt's
names.  MURDERD_BENCH_LT holds JSON: {"all": {...}, "seeder": {...}, "peer": {...}}.
Never used outside the benchmarks.
"""

import json
import os

_raw = os.environ.get("MURDERD_BENCH_LT")
if _raw:
    _overrides = json.loads(_raw)
    import murderd.lt as _mlt

    _original = _mlt.lan_settings

    def lan_settings(*args, **kwargs):
        settings = _original(*args, **kwargs)
        settings.update(_overrides.get("all", {}))
        settings.update(_overrides.get("seeder" if kwargs.get("seeder") else "peer", {}))
        return settings

    _mlt.lan_settings = lan_settings

    # "seed_flags": torrent flags the seeder sets on each deploy it seeds (e.g. super_seeding).
    _seed_flags = _overrides.get("seed_flags")
    if _seed_flags:
        import murderd.seeder as _seeder

        _original_seed = _seeder.SeederService._seed

        def _seed(self, deploy, parsed):
            flags = [f for f in _seed_flags if not f.startswith("-")]
            if "-seed_mode" in _seed_flags:  # check the data (a full hash pass) instead
                params = _mlt.lt.add_torrent_params()
                params.ti = parsed.info
                params.save_path = str(self.drop_dir)
                params.flags = 0
                for _flag in flags:
                    params.flags |= getattr(_mlt.lt.torrent_flags, _flag)
                deploy.handle = self.session.add_torrent(params)
                return
            _original_seed(self, deploy, parsed)
            for _flag in flags:
                deploy.handle.set_flags(getattr(_mlt.lt.torrent_flags, _flag))

        _seeder.SeederService._seed = _seed

    # "trace_blocks": a directory; each peer writes "<seconds> <piece> <block> <from ip>" per
    # block it receives into <dir>/<pid>.blocks (diagnosis: who sent which piece, and when).
    _trace_dir = _overrides.get("trace_blocks")
    if _trace_dir:
        import time as _time

        import murderd.peer as _peer

        _original_alert = _peer.PeerService._alert
        _original_start = _peer.PeerService.start

        async def _start(self):
            await _original_start(self)
            mask = self.session.get_settings()["alert_mask"]
            mask |= _mlt.lt.alert.category_t.block_progress_notification
            self.session.apply_settings({"alert_mask": mask})
            self._trace = open(os.path.join(_trace_dir, f"{os.getpid()}.blocks"), "w")  # noqa: SIM115

        def _alert(self, alert):
            if isinstance(alert, _mlt.lt.block_finished_alert):
                self._trace.write(
                    f"{_time.time():.4f} {alert.piece_index} {alert.block_index} {alert.ip[0]}\n"
                )
                return
            _original_alert(self, alert)

        _peer.PeerService.start = _start
        _peer.PeerService._alert = _alert
