"""Job rows for the tests that write them directly: the ids they name and the factories' types."""

from __future__ import annotations

from collections.abc import Callable

from shared.models import Job

#: The one stored image tests/shared's jobs name (as content and style).
IMAGE = "a" * 64
#: The content and style images tests/worker's jobs name.
CONTENT, STYLE = "c" * 64, "s" * 64
NODE = "cpu@testhost"
MakeJob = Callable[..., str]
LoadJob = Callable[[str], Job]
