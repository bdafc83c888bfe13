"""Reading a workflow from Python: `WorkflowClient` and the event-stream parser."""

from server.client.sse import EventStreamParser, ServerSentEvent
from server.client.workflow import (
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
