"""Reading a workflow from Python: `WorkflowClient` and the event-stream parser."""

from .sse import EventStreamParser, ServerSentEvent
from .workflow import (
    ClientError,
    Event,
    Gap,
    Message,
    ProblemError,
    Unavailable,
    WorkflowClient,
    is_final,
)

__all__ = [
    "ClientError",
    "Event",
    "EventStreamParser",
    "Gap",
    "Message",
    "ProblemError",
    "ServerSentEvent",
    "Unavailable",
    "WorkflowClient",
    "is_final",
]
