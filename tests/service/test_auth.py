import pytest

from service.auth import SHARED_TENANT, ApiKeyChecker, Tenants, load_api_keys
from service.bind_policy import InsecureBindError, check_bind_is_safe
from service.errors import Unauthenticated


def test_keys_from_env_and_file(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# comment\nfile-key\n\n")
    assert load_api_keys("a, b,,", str(key_file)) == ["a", "b", "file-key"]


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Bearer k1", True),
        ("bearer k2", True),
        ("Bearer wrong", False),
        ("k1", False),
        ("Basic k1", False),
        (None, False),
        ("Bearer ", False),
    ],
)
def test_bearer_check(header, ok):
    assert ApiKeyChecker(["k1", "k2"]).is_valid(header) is ok


def test_tenant_is_the_keys_position_never_the_key():
    tenants = Tenants(["secret-one", "secret-two"])
    assert tenants.of((("authorization", "Bearer secret-two"),)) == "key-1"
    assert tenants.of((("other", "x"), ("authorization", "bearer secret-one"))) == "key-0"
    with pytest.raises(Unauthenticated) as refused:
        tenants.of((("authorization", "Bearer secret-three"),))
    assert "secret" not in str(refused.value) and "secret" not in repr(tenants)


def test_without_keys_every_caller_is_one_tenant():
    tenants = Tenants([])
    assert tenants.of(()) == tenants.of((("authorization", "Bearer anything"),)) == SHARED_TENANT


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_open_server_may_bind_loopback(host):
    check_bind_is_safe(host, [], insecure=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.com"])
def test_open_server_refuses_other_addresses_unless_insecure(host):
    with pytest.raises(InsecureBindError):
        check_bind_is_safe(host, [], insecure=False)
    check_bind_is_safe(host, [], insecure=True)
    check_bind_is_safe(host, ["key"], insecure=False)
