"""Client calls of the two-node cluster's object store (tests/test_cluster.py), run inside the head's network
namespace: moto's S3 server listens there, and nothing routes from the host into the namespaces.

    python -m tests.s3_netns setup ENDPOINT BUCKET...  -> {"key_id", "secret"}: an IAM user and key (moto's
                                                          unauthenticated actions), then the buckets, signed
    python -m tests.s3_netns get ENDPOINT BUCKET KEY   -> the object on stdout; exit 3 when there is none
    python -m tests.s3_netns sync ENDPOINT BUCKET PREFIX DEST -> every object under PREFIX into folder DEST

boto3 here, not the code under test; credentials (after setup) from the environment's credentials file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import boto3
from botocore.exceptions import ClientError

POLICY = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'


def client(service: str, endpoint: str, **keys: str):
    return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1", **keys)


def main(argv: list[str]) -> int:
    cmd, endpoint, *rest = argv
    if cmd == "setup":
        iam = client("iam", endpoint, aws_access_key_id="unused", aws_secret_access_key="unused")
        iam.create_user(UserName="facesr")
        iam.put_user_policy(UserName="facesr", PolicyName="all", PolicyDocument=POLICY)
        key = iam.create_access_key(UserName="facesr")["AccessKey"]
        s3 = client("s3", endpoint, aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        for bucket in rest:
            s3.create_bucket(Bucket=bucket)
        print(json.dumps({"key_id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}))
        return 0
    s3 = client("s3", endpoint)
    if cmd == "get":
        bucket, key = rest
        try:
            sys.stdout.buffer.write(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return 3
            raise
        return 0
    if cmd == "sync":
        bucket, prefix, dest = rest
        n = 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):  # a folder marker (pyarrow makes them), not a file
                    continue
                out = Path(dest) / obj["Key"][len(prefix):].lstrip("/")
                out.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, obj["Key"], str(out))
                n += 1
        print(n)
        return 0
    raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
