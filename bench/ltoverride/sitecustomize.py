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

    # "const": {"murderd.MODULE.NAME": value}: module constants for A/B tuning runs.
    import importlib as _importlib

    for _name, _value in _overrides.get("const", {}).items():
        _module, _, _attr = _name.rpartition(".")
        _mod = _importlib.import_module(_module)
        if not hasattr(_mod, _attr):
            raise SystemExit(f"MURDERD_BENCH_LT: {_name} does not exist")
        setattr(_mod, _attr, _value)

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

    # "trace_peers": a directory; every daemon writes one line per connection every 0.25 s into
    # <dir>/<role>-<pid>.peers: "<seconds> <remote ip> <payload down B/s> <payload up B/s>
    # <download queue> <upload queue> <used send buffer> <rtt ms> <queue bytes> <end game>"
    # (diagnosis: how the source's upload is shared between its connections, and why).
    _peers_dir = _overrides.get("trace_peers")
    if _peers_dir:
        import threading as _threading
        import time as _ptime

        import murderd.peer as _ppeer
        import murderd.seeder as _pseeder

        def _trace_loop(service, role):
            out = open(os.path.join(_peers_dir, f"{role}-{os.getpid()}.peers"), "w")  # noqa: SIM115
            end = _ptime.monotonic() + 600
            while _ptime.monotonic() < end:
                _ptime.sleep(0.25)
                session = getattr(service, "session", None)
                if session is None:
                    continue
                now = _ptime.time()
                for handle in session.get_torrents():
                    for p in handle.get_peer_info():
                        out.write(
                            f"{now:.3f} {p.ip[0]} {p.payload_down_speed} {p.payload_up_speed} "
                            f"{p.download_queue_length} {p.upload_queue_length} "
                            f"{p.used_send_buffer} {p.rtt} {p.queue_bytes} "
                            f"{int(p.endgame_mode)}\n"
                        )
                out.flush()

        for _cls, _role in ((_ppeer.PeerService, "peer"), (_pseeder.SeederService, "seeder")):

            def _wrap(original, role):
                async def start(self):
                    await original(self)
                    _threading.Thread(target=_trace_loop, args=(self, role), daemon=True).start()

                return start

            _cls.start = _wrap(_cls.start, _role)
