"""Which transfer client S3 file transfers use, and the settings that go with it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cpt_training.config import StorageTuning
from cpt_training.storage import TransferSettings, transfer

pytestmark = pytest.mark.unit


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unit")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unit")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.mark.parametrize("installed", [True, False])
def test_auto_uses_the_crt_client_exactly_when_awscrt_is_installed_and_no_throttle_is_asked(
    monkeypatch: pytest.MonkeyPatch, installed: bool
) -> None:
    monkeypatch.setattr(transfer, "crt_available", lambda: installed)
    assert transfer.use_crt(TransferSettings()) is installed
    assert transfer.use_crt(TransferSettings(max_bandwidth=1 << 20)) is False
    assert transfer.use_crt(TransferSettings(transfer_client="classic")) is False


def test_asking_for_crt_without_awscrt_fails_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transfer, "crt_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"transfer_client crt \(storage.transferClient\) needs"):
        transfer.use_crt(TransferSettings(transfer_client="crt"))


def test_bad_transfer_client_settings_are_rejected_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"transfer_client must be one of auto, classic, crt"):
        TransferSettings(transfer_client="turbo")
    with pytest.raises(ValueError, match=r"max_bandwidth .* needs the classic transfer client"):
        TransferSettings(transfer_client="crt", max_bandwidth=1 << 20)


def test_crt_availability_matches_whether_awscrt_imports() -> None:
    try:
        import importlib

        importlib.import_module("awscrt.s3")
        expected = True
    except ImportError:
        expected = False
    assert transfer.crt_available() is expected


def test_the_classic_client_skips_the_payload_hash_and_shares_one_session(
    aws_env: None,
) -> None:
    a = transfer.s3_client(TransferSettings(max_concurrency=3))
    b = transfer.s3_client(TransferSettings(max_concurrency=5))
    assert a is not b
    assert a.meta.config.s3["payload_signing_enabled"] is False
    # Both clients come from one botocore session (the S3 model is parsed once per process).
    assert a.meta.events is not b.meta.events
    assert transfer._sessions() is transfer._sessions()


def test_copies_always_use_the_classic_manager(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "crt_available", lambda: True)
    s = TransferSettings()
    client = transfer.s3_client(s)
    with transfer._transfer_manager(client, s, copy=True) as tm:
        assert hasattr(tm, "copy"), "s3transfer's manager"


@pytest.mark.skipif(not transfer.crt_available(), reason="awscrt is not installed")
def test_file_transfers_go_through_one_shared_crt_client_where_installed(aws_env: None) -> None:
    s = TransferSettings()
    client = transfer.s3_client(s)
    with transfer._transfer_manager(client, s) as tm:
        assert isinstance(tm, transfer._CrtTransfers)
    assert transfer._crt_client(client) is transfer._crt_client(client)


def test_the_crt_throughput_target_comes_from_the_stage_config_and_must_be_positive() -> None:
    assert StorageTuning().transfer_settings().crt_target_gbps is None
    assert StorageTuning(target_gbps=100).transfer_settings().crt_target_gbps == 100.0
    for bad in ("fast", "0", "-5", "nan", "inf"):
        with pytest.raises(ValidationError, match=r"targetGbps"):
            StorageTuning.model_validate({"targetGbps": bad})
    with pytest.raises(ValueError, match=r"crt_target_gbps .* must be a positive number"):
        TransferSettings(crt_target_gbps=0.0)


@pytest.mark.skipif(not transfer.crt_available(), reason="awscrt is not installed")
def test_each_crt_throughput_target_gets_its_own_shared_client(aws_env: None) -> None:
    client = transfer.s3_client(TransferSettings())
    default = transfer._crt_client(client)[0]
    fast = transfer._crt_client(client, 100.0)[0]
    assert fast is not default
    assert transfer._crt_client(client, 100.0)[0] is fast
    with transfer._transfer_manager(client, TransferSettings(crt_target_gbps=100.0)) as tm:
        assert isinstance(tm, transfer._CrtTransfers)
