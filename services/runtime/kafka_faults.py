"""Which Kafka failures a stage waits out and which end it: the classification behind `LogError.retriable`.

aiokafka's own `retriable` flag answers "may the same request succeed if sent again at once", which is
narrower than what a stage needs: a failed commit after a rebalance (CommitFailedError, IllegalStateError
for a partition no longer assigned, IllegalGenerationError, UnknownMemberIdError) is not retriable as a
request, but it is normal life for a consumer group: the records are read again by their new owner and the
ledger absorbs them. A producer that gave up after its request timeout (KafkaTimeoutError) is not flagged
retriable either, yet a broker restart is exactly that. So:

    KafkaError
     |-- permanent (the stage exits with one line): a refused login, a missing authorisation,
     |   a topic the broker does not know (checked at start, see `missing_topics`), a record too large,
     |   an unsupported broker version
     `-- recoverable (log one line, back off, rejoin or retry): everything else, in particular broker
         unreachable, request timeout, rebalance in progress, coordinator moved or unavailable, leader not
         available, commit failed / illegal generation / unknown member

Unknown errors count as recoverable: a stage that waits logs it and keeps its place; a stage that exits on
a transient error loses its in-flight work and, under Kubernetes, restarts into the same condition.
"""

from __future__ import annotations

from aiokafka import errors

PERMANENT: tuple[type[BaseException], ...] = (
    errors.SaslAuthenticationFailed,
    errors.AuthenticationFailedError,
    errors.AuthenticationMethodNotSupported,
    errors.UnsupportedSaslMechanismError,
    errors.IllegalSaslStateError,
    errors.TopicAuthorizationFailedError,
    errors.GroupAuthorizationFailedError,
    errors.ClusterAuthorizationFailedError,
    errors.TransactionalIdAuthorizationFailed,
    errors.MessageSizeTooLargeError,
    errors.RecordTooLargeError,
    errors.InvalidTopicError,
    errors.UnsupportedVersionError,
    errors.UnsupportedCodecError,
    errors.InvalidReplicationFactorError,
    errors.InvalidPartitionsError,
    errors.PolicyViolationError,
)


def recoverable(exc: BaseException) -> bool:
    """True when waiting (and rejoining the group, or sending again) can get past `exc`."""
    if isinstance(exc, PERMANENT):
        return False
    return isinstance(exc, errors.KafkaError | OSError | TimeoutError)
