"""Step 2 of the request path: a request becomes a task on its model's priority queue
(`dispatch`, with the Celery message built by hand in `task_message`), its record says
where it is (`records`), and low requests that waited too long move up (`aging`)."""

from __future__ import annotations

from gateway.queueing.dispatch import Dispatcher

__all__ = ["Dispatcher"]
