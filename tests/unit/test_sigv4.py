"""SigV4 signing of the firmware store's S3 backend, against AWS's published examples."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from fleetflow.sigv4 import EMPTY_SHA256, sign, uri_encode

# AWS's example credentials (S3 API reference, "Signature Calculations for the Authorization
# Header: Transferring Payload in a Single Chunk")
S3_KEY = "AKIAIOSFODNN7EXAMPLE"
S3_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
S3_DAY = datetime(2013, 5, 24, tzinfo=UTC)


def _signature(headers: dict[str, str]) -> str:
    return headers["Authorization"].rsplit("Signature=", 1)[1]


def test_s3_get_object_with_a_range() -> None:
    headers = sign(
        method="GET",
        host="examplebucket.s3.amazonaws.com",
        path="/test.txt",
        query={},
        headers={"Range": "bytes=0-9"},
        payload_sha256=EMPTY_SHA256,
        access_key=S3_KEY,
        secret_key=S3_SECRET,
        region="us-east-1",
        now=S3_DAY,
    )
    assert headers["x-amz-date"] == "20130524T000000Z"
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_s3_put_object_with_an_encoded_key_and_a_body() -> None:
    body = b"Welcome to Amazon S3."
    headers = sign(
        method="PUT",
        host="examplebucket.s3.amazonaws.com",
        path="/" + uri_encode("test$file.text"),
        query={},
        headers={"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"},
        payload_sha256=hashlib.sha256(body).hexdigest(),
        access_key=S3_KEY,
        secret_key=S3_SECRET,
        region="us-east-1",
        now=S3_DAY,
    )
    assert (
        "SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class"
        in (headers["Authorization"])
    )
    assert _signature(headers) == "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"


def test_generic_suite_query_parameters_sorted() -> None:
    """aws-sig-v4-test-suite: get-vanilla and get-vanilla-query-order-key-case."""
    common = {
        "method": "GET",
        "host": "example.amazonaws.com",
        "path": "/",
        "headers": {},
        "payload_sha256": EMPTY_SHA256,
        "access_key": "AKIDEXAMPLE",
        "secret_key": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        "region": "us-east-1",
        "service": "service",
        "now": datetime(2015, 8, 30, 12, 36, tzinfo=UTC),
        "content_header": False,
    }
    vanilla = sign(query={}, **common)  # type: ignore[arg-type]
    assert _signature(vanilla) == "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    ordered = sign(query={"Param2": "value2", "Param1": "value1"}, **common)  # type: ignore[arg-type]
    assert _signature(ordered) == "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
