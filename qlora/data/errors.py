"""The one exception type of the data pipeline."""
from qlora.errors import UserError


class DataError(UserError, ValueError):
    """A record or a data source the pipeline cannot use. The message names the record index (or the
    source), the problem and the fix, so that a bad line in a large file can be found and repaired."""


class MissingSourceError(DataError, FileNotFoundError):
    """A local data source (a path) that does not exist."""
