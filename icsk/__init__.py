"""icsk — the Internal Covariate Shift Kit.

Record how activation distributions inside a network move during training, with and without
normalization, and measure whether that movement matters for optimization.
"""

from .hooks import Recorder, RecorderError, select_layers
from .schedule import Schedule
from .store import RunFolderError, load_run

__version__ = "0.1.0"
__all__ = ["Recorder", "RecorderError", "RunFolderError", "Schedule", "load_run", "select_layers", "__version__"]
