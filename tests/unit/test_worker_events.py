from common.broker import worker_connection_name
from services.executor.worker_events import worker_id_of


def test_worker_id_from_user_provided_name() -> None:
    name = worker_connection_name("shell", "shell-1a2b3c4d")
    assert worker_id_of({"user_provided_name": name}) == "shell-1a2b3c4d"
    assert worker_id_of({"user_provided_name": name.encode()}) == "shell-1a2b3c4d"


def test_worker_id_from_client_properties() -> None:
    props = {"connection_name": worker_connection_name("py", "py-00000000")}
    assert worker_id_of({"client_properties": props}) == "py-00000000"


def test_other_connections_are_not_workers() -> None:
    assert worker_id_of({"user_provided_name": "vigil-executor executor-1"}) is None
    assert worker_id_of({}) is None
