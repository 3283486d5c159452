"""The heartbeat of one service process: its ``instances`` row kept alive on a thread from start to stop.

``Heartbeat(store, name, interval_s).start()`` registers a new instance (the first beat, in the caller: a database
that cannot take it is ``StorageUnavailableError``), then beats every ``interval_s`` on a daemon thread of its own,
so that neither a busy event loop nor a full thread pool of request work delays a beat. A failed beat is logged
(once per outage) and tried again at the next interval. ``stop()`` ends the thread and deletes the row, so a clean
shutdown frees at once whatever the process still holds. See :mod:`service.storage.instances`.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.exc import SQLAlchemyError

from service.storage.instances import DEAD_AFTER_BEATS, Instance
from service.storage.store import InspectionStore, StorageUnavailableError

logger = logging.getLogger("dhrclip.storage")


class Heartbeat:
    def __init__(self, store: InspectionStore, name: str, interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"heartbeat interval must be > 0, got {interval_s!r}")
        self.store, self.interval_s = store, float(interval_s)
        self.instance = Instance.new(name)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Heartbeat:
        """Blocking: the first beat, then the beating thread."""
        try:
            self.store.beat(self.instance, self.interval_s)
        except SQLAlchemyError as exc:
            cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise StorageUnavailableError(f"database heartbeat failed: {cause}") from None
        self._thread = threading.Thread(target=self._run, name="dhr-heartbeat", daemon=True)
        self._thread.start()
        logger.info(
            "instance %s (%s) beats every %.3g s; dead after %d silent beats",
            self.instance.id, self.instance.name, self.interval_s, DEAD_AFTER_BEATS,
        )  # fmt: skip
        return self

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval_s):
            try:
                self.store.beat(self.instance, self.interval_s)
            except Exception as exc:  # noqa: BLE001 - any failure: logged once, the next beat tries again
                if not failing:
                    logger.warning("heartbeat of instance %s failed, retrying every beat: %s", self.instance.id, exc)
                failing = True
                continue
            if failing:
                logger.info("heartbeat of instance %s works again", self.instance.id)
            failing = False

    def stop(self) -> None:
        """Blocking: end the thread and delete this instance's row (a failure to delete is logged; the row then
        counts as dead once its ``alive_until`` passes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.store.forget_instance(self.instance.id)
        except Exception as exc:  # noqa: BLE001 - shutdown goes on; the row expires by itself
            logger.warning("instance %s: row not deleted at shutdown (%s); it expires by itself", self.instance.id, exc)
