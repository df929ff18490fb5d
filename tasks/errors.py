"""The mistakes a user can make in what they give us (a spec, a file, a run id, a flag, a server's key).

They are reported as one clear line naming the file, row or field; anything else is a bug and
keeps its traceback.
"""

from pydantic import ValidationError

from tasks.config import SpecError
from tasks.curation.label_studio import LabelStudioError
from tasks.store.sql import StoreError

USER_ERRORS = (SpecError, StoreError, LabelStudioError, ValidationError, FileNotFoundError, ValueError)


class RunStopped(Exception):
    """A command stopped on Ctrl-C or SIGTERM after committing what had finished."""
