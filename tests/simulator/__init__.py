"""A faithful simulator of the IoT platform's northbound API (IoCM) for tests and benchmarks.

What it implements is described in ``docs/platform-api.md``. Entry points:

* :class:`Simulator` — in-process, ``await start()`` / ``await stop()`` on the caller's loop;
* :class:`SimulatorThread` — in-process on its own loop in a thread, sync ``start()``/``stop()``;
* :class:`SimulatorProcess` — ``python -m tests.simulator`` as a child process;
* :class:`SimulatorControl` — async httpx client of the ``/_sim/`` control endpoints.
"""

from tests.simulator.control import SimulatorControl, SimulatorControlError
from tests.simulator.process import SimulatorProcess
from tests.simulator.server import Simulator, SimulatorThread, server_ssl_context
from tests.simulator.state import (
    HOME_APP_ID,
    HOME_SECRET,
    OTHER_APP_ID,
    OTHER_SECRET,
    PARTNER_APP_ID,
    PARTNER_SECRET,
    PlatformState,
    SimConfig,
)

__all__ = [
    "HOME_APP_ID",
    "HOME_SECRET",
    "OTHER_APP_ID",
    "OTHER_SECRET",
    "PARTNER_APP_ID",
    "PARTNER_SECRET",
    "PlatformState",
    "SimConfig",
    "Simulator",
    "SimulatorControl",
    "SimulatorControlError",
    "SimulatorProcess",
    "SimulatorThread",
    "server_ssl_context",
]
