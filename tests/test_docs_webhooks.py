"""The README's ways to verify an outbound webhook in another language work: the Node
function and the openssl script accept a delivery signed per Standard Webhooks, and
refuse one that was tampered with. The README shows verify.js as it is."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
import standardwebhooks

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples" / "webhooks"
README = Path(__file__).resolve().parent.parent / "README.md"
SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
BODY = json.dumps({"type": "order.expired", "timestamp": "2026-11-30T12:00:00+00:00", "data": {}})


def signed(
    body: str = BODY, msg_id: str = "0f4d6c1e-1b7e-4c57-9a7e-3f2d1c0b9a88"
) -> dict[str, str]:
    now = datetime.now(tz=UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": standardwebhooks.Webhook(SECRET).sign(msg_id, now, body),
    }


def test_the_readme_shows_verify_js_as_it_is() -> None:
    assert (EXAMPLES / "verify.js").read_text().rstrip("\n") in README.read_text()


@pytest.mark.skipif(shutil.which("node") is None, reason="no Node.js on this machine")
def test_the_node_example_accepts_a_signed_delivery_and_refuses_a_tampered_one() -> None:
    headers = signed()
    script = (
        f"const {{verify}} = require({json.dumps(str(EXAMPLES / 'verify.js'))});"
        f"const h = {json.dumps(headers)}, s = {json.dumps(SECRET)}, b = {json.dumps(BODY)};"
        "console.log(JSON.stringify([verify(s, h, b), verify(s, h, b + ' '),"
        " verify(s, {...h, 'webhook-id': 'other'}, b)]));"
    )
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [True, False, False]


def openssl_signature(headers: dict[str, str], body: Path) -> str:
    args = [SECRET, headers["webhook-id"], headers["webhook-timestamp"], str(body)]
    out = subprocess.run(
        ["sh", str(EXAMPLES / "verify.sh"), *args], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl on this machine")
def test_the_openssl_example_prints_the_signature_the_header_carries(tmp_path: Path) -> None:
    headers = signed()
    body = tmp_path / "body.json"
    body.write_text(BODY)
    assert openssl_signature(headers, body) in headers["webhook-signature"].split(" ")
    body.write_text(BODY + " ")
    assert openssl_signature(headers, body) not in headers["webhook-signature"].split(" ")
