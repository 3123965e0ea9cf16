"""The Faust adapter's configuration reaches the clients it builds (no broker needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.app import Processor, StreamsConfig, Transport


def _processor(tmp_path: Path, **kwargs: object) -> Processor:
    config = StreamsConfig(
        store="memory://", data_dir=str(tmp_path), topic_prefix="t.", **kwargs  # type: ignore[arg-type]
    )
    return Processor(config)


@pytest.mark.parametrize("wait", [0.0, 0.02, 1.5])
async def test_worker_consumer_uses_the_configured_fetch_wait(tmp_path: Path, wait: float) -> None:
    processor = _processor(tmp_path, fetch_max_wait=wait)
    app = processor.app
    assert isinstance(app.transport, Transport)
    thread = app.consumer._thread
    consumer = thread._create_worker_consumer(app.transport)
    try:
        # start() builds the fetcher from this attribute; Faust alone would pass 1500
        assert consumer._fetch_max_wait_ms == round(wait * 1000)
    finally:
        await consumer._client.close()


def test_negative_fetch_wait_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fetch_max_wait"):
        _processor(tmp_path, fetch_max_wait=-1.0)
