"""``python -m hf_gpam.cli ...``: the ``hf-gpam`` command."""

import importlib.util
import sys

from . import main


if __name__ == "__main__":
    # A process that multiprocessing spawns (transformers serve's model worker, for hf-gpam serve) re-imports the main
    # module by the name of its spec, and skips names ending in ".__main__". Named as the package instead, the worker
    # imports hf_gpam.cli, which binds the GPAM classes there (HF_GPAM_SERVE_BINDING); this file's body then runs
    # under another name and does nothing.
    sys.modules["__main__"].__spec__ = importlib.util.find_spec("hf_gpam.cli")
    sys.exit(main())
