"""Keep TensorFlow's native start-up chatter out of the user's terminal.

Imports nothing heavy itself: it must run before TensorFlow is imported.
"""

from __future__ import annotations

import os
import sys


def import_tensorflow_quietly() -> str:
    """Import TensorFlow and probe its devices with native stderr captured.

    TensorFlow 2.21 writes INFO lines from C++ (oneDNN, CUDA stubs, absl) at
    import and device discovery, ignoring `TF_CPP_MIN_LOG_LEVEL`. They bury the
    one line a user needs. What was captured is returned, and written out
    if the import fails.
    """
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            import tensorflow

            tensorflow.config.list_physical_devices("GPU")
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            if failed:
                sys.stderr.write(text)
    return text
