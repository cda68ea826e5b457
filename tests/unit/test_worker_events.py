from common.broker import worker_connection_name, worker_queue
from services.executor.worker_events import lost_worker


def test_a_closed_worker_connection_names_the_worker() -> None:
    name = worker_connection_name("shell", "shell-1a2b3c4d")
    assert lost_worker("connection.closed", {"user_provided_name": name}, "v") == \
        "shell-1a2b3c4d"
    assert lost_worker("connection.closed", {"user_provided_name": name.encode()}, "v") == \
        "shell-1a2b3c4d"


def test_other_connections_are_not_workers() -> None:
    assert lost_worker("connection.closed",
                       {"user_provided_name": "vigil-executor executor-1"}, "v") is None
    assert lost_worker("connection.closed", {"name": "127.0.0.1:5 -> 127.0.0.1:5672"},
                       "v") is None


def test_a_consumer_the_broker_removed_means_the_worker_died() -> None:
    headers = {"queue": worker_queue("py-00000000"), "vhost": "v",
               "user_who_performed_action": "rmq-internal"}
    assert lost_worker("consumer.deleted", headers, "v") == "py-00000000"


def test_a_consumer_the_worker_cancelled_or_of_another_vhost_is_not_a_loss() -> None:
    headers = {"queue": worker_queue("py-00000000"), "vhost": "v",
               "user_who_performed_action": "vigil"}
    assert lost_worker("consumer.deleted", headers, "v") is None
    headers["user_who_performed_action"] = "rmq-internal"
    assert lost_worker("consumer.deleted", headers, "other") is None
    assert lost_worker("consumer.deleted", {**headers, "queue": "vigil.dead-letters"},
                       "v") is None
