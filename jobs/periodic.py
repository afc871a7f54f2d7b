"""Background threads that touch the database on a timer: a failed round (the database restarting) is logged and
tried again at the next tick, and the thread's connection is closed so the next round opens a fresh one."""
import logging

from django.db import close_old_connections


def run_every(seconds, fn, stopped, what, *, wait_first=False, log=logging.getLogger(__name__)):
    """Calls fn every `seconds` until the `stopped` event is set."""
    if wait_first and stopped.wait(seconds):
        return
    while not stopped.is_set():
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the database may be restarting; try again next tick
            log.warning("%s failed: %s", what, exc)
        finally:
            close_old_connections()
        stopped.wait(seconds)
