"""What a run dir keeps of Ray's session logs (issue 34): a bounded copy, never a link into Ray's temp dir, which a
reboot or a clean-up of /tmp empties (a dangling link in a run dir stopped `ray up`). The copy made at the end of
a real `hkd run` is checked in test_console (the method run's `logs/ray/`)."""

from __future__ import annotations

import os

from orchestrator.cluster.placement import copy_session_logs


def test_copy_is_bounded_keeps_each_files_end_and_replaces_the_old_link(tmp_path):
    session = tmp_path / "session_x" / "logs"
    (session / "events").mkdir(parents=True)
    (session / "raylet.out").write_bytes(b"start\n" + b"." * 5000 + b"\nthe error at the end\n")
    (session / "gcs_server.out").write_text("gcs\n")
    (session / "events" / "event_RAYLET.log").write_text("event\n")
    old = session / "old.log"
    old.write_bytes(b"x" * 3000)
    os.utime(old, (1, 1))  # the oldest file: the first left out once the budget is spent
    (session / "dangling.log").symlink_to(tmp_path / "gone")
    dest = tmp_path / "run" / "logs" / "ray"
    dest.parent.mkdir(parents=True)
    dest.symlink_to(session)  # what hkd left before issue 34

    left_out = copy_session_logs(session, dest, tail=1000, total=1500)

    assert not dest.is_symlink() and dest.is_dir()
    raylet = (dest / "raylet.out").read_text()
    assert raylet.startswith(f"[{5028 - 1000} bytes before cut; the whole file: {session / 'raylet.out'}]")
    assert raylet.endswith("the error at the end\n") and len(raylet.splitlines()[-1]) < 1000
    assert (dest / "gcs_server.out").read_text() == "gcs\n"
    assert (dest / "events" / "event_RAYLET.log").read_text() == "event\n"
    assert left_out == ["old.log"] and not (dest / "old.log").exists()
    assert not (dest / "dangling.log").exists()
