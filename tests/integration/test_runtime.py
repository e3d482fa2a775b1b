"""The shared daemon runtime, seen from outside as systemd and logrotate see it."""

from __future__ import annotations

import os
import signal

from murderd.localfleet import free_port, wait_for, write_config


def tracker_config(tmp_path, **tracker):
    settings = {
        "listen": f"127.0.0.1:{free_port()}",
        "torrents_dir": str(tmp_path / "torrents"),
        "state_dir": str(tmp_path / "state"),
    }
    settings.update(tracker)
    (tmp_path / "torrents").mkdir(exist_ok=True)
    return write_config(tmp_path, {"tracker": settings})


def test_sd_notify_ready_status_watchdog_stopping(tmp_path, daemons):
    config = tracker_config(tmp_path)
    tracker = daemons("tracker", config, tmp_path, env={"WATCHDOG_USEC": "200000"})
    messages = tracker.poll_messages()
    assert "READY=1" in messages
    assert any(m.startswith("STATUS=") for m in messages)
    # Fed at half the watchdog interval: several pings arrive within a second or two.
    wait_for(lambda: tracker.poll_messages().count("WATCHDOG=1") >= 4, 10, what="watchdog pings")
    tracker.signal(signal.SIGTERM)
    assert tracker.proc.wait(20) == 0
    assert "STOPPING=1" in tracker.poll_messages()
    log = tracker.log_text()
    assert "murder-tracker stopped" in log and "Traceback" not in log


def test_no_watchdog_without_watchdog_usec(tmp_path, daemons):
    tracker = daemons("tracker", tracker_config(tmp_path), tmp_path)
    tracker.signal(signal.SIGHUP)  # something that surely takes a loop turn or two
    tracker.wait_message("RELOADING=1", 10)
    tracker.wait_message("READY=1", 10)
    assert "WATCHDOG=1" not in tracker.poll_messages()


def test_sighup_applies_live_keys_and_names_restart_keys(tmp_path, daemons):
    config = tracker_config(tmp_path, interval=15)
    tracker = daemons("tracker", config, tmp_path)
    text = config.read_text().replace("interval = 15", "interval = 42")
    text = text.replace("[tracker]", "[tracker]\nsubnet_prefix_v4 = 16\nnumwant_max = 7")
    old_listen = [line for line in text.splitlines() if line.startswith("listen")][0]
    text = text.replace(old_listen, f"listen = 127.0.0.1:{free_port()}")
    config.write_text(text)
    tracker.messages.clear()
    tracker.signal(signal.SIGHUP)
    wait_for(lambda: "reload done" in tracker.log_text(), 10, what="reload")
    messages = tracker.poll_messages()
    assert messages.index("RELOADING=1") < len(messages) - 1
    assert "READY=1" in messages[messages.index("RELOADING=1") :]
    log = tracker.log_text()
    assert "[tracker] interval is now 42" in log
    assert "[tracker] numwant_max is now 7" in log
    assert "[tracker] listen changed from" in log and "takes effect after a restart" in log
    assert tracker.proc.poll() is None


def test_bad_config_on_reload_keeps_running(tmp_path, daemons):
    config = tracker_config(tmp_path)
    tracker = daemons("tracker", config, tmp_path)
    config.write_text(config.read_text() + "bogus_key = 1\n")
    tracker.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in tracker.log_text(), 10, what="reload refusal")
    assert "bogus_key: unknown key" in tracker.log_text()
    assert tracker.proc.poll() is None
    tracker.wait_message("READY=1", 5)


def test_log_follows_logrotate_move(tmp_path, daemons):
    """WatchedFileHandler: after logrotate moves the file, the daemon writes a new one."""
    config = tracker_config(tmp_path)
    tracker = daemons("tracker", config, tmp_path)
    log_path = tracker.log_path
    wait_for(lambda: "ready" in tracker.log_text(), 10, what="first log lines")
    os.rename(log_path, log_path.with_suffix(".log.1"))
    tracker.signal(signal.SIGHUP)
    wait_for(log_path.exists, 10, what="a new log file after the move")
    wait_for(lambda: "reload done" in log_path.read_text(), 10, what="lines in the new file")
    rotated = log_path.with_suffix(".log.1").read_text()
    assert "ready" in rotated and "reload done" not in rotated


def test_sigint_stops_too(tmp_path, daemons):
    tracker = daemons("tracker", tracker_config(tmp_path), tmp_path)
    tracker.signal(signal.SIGINT)
    assert tracker.proc.wait(20) == 0
    assert "received SIGINT: stopping" in tracker.log_text()


def test_port_in_use_is_a_clear_error(tmp_path, daemons):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tracker_config(tmp_path, listen=f"127.0.0.1:{port}")
        tracker = daemons("tracker", config, tmp_path, wait=False)
        assert tracker.proc.wait(30) == 1
    log = tracker.log_text()
    assert "cannot start" in log and str(port) in log
    assert "Traceback" not in log
    assert "READY=1" not in tracker.poll_messages()
