"""moto_server with each DynamoDB request applied whole before the next, as DynamoDB applies a conditional write.

moto checks a ConditionExpression and then writes, with nothing between the two that stops another request: two
executions registering one batch in the same instant both pass ``attribute_not_exists(pk)``, which DynamoDB never
lets happen. The end-to-end test's duplicate triggers start such pairs; this keeps moto to DynamoDB's guarantee.
Run as a script, with moto_server's own arguments.
"""

import sys
import threading

from moto.dynamodb.responses import DynamoHandler
from moto.server import main

_one_at_a_time = threading.Lock()
_call_action = DynamoHandler.call_action


def _atomic_call_action(self: DynamoHandler) -> object:
    with _one_at_a_time:
        return _call_action(self)


DynamoHandler.call_action = _atomic_call_action  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
