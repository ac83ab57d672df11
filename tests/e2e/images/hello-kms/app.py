"""A boto3 application, unchanged for the enclave: it finds KMS through AWS_ENDPOINT_URL_KMS."""

import base64
import json
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
from botocore.exceptions import ClientError

KMS = boto3.client("kms")


def _b64(data):
    return base64.b64encode(data).decode()


def _call(path, query):
    if path == "/decrypt":
        blob = base64.b64decode(query["blob"][0])
        return {"Plaintext": _b64(KMS.decrypt(CiphertextBlob=blob)["Plaintext"])}
    if path == "/generate-data-key":
        answer = KMS.generate_data_key(KeyId=query["key"][0], KeySpec="AES_256")
        again = KMS.decrypt(CiphertextBlob=answer["CiphertextBlob"])["Plaintext"]
        return {"Plaintext": _b64(answer["Plaintext"]), "Decrypted": _b64(again)}
    if path == "/generate-random":
        return {"Plaintext": _b64(KMS.generate_random(NumberOfBytes=32)["Plaintext"])}
    return {"hello": "kms"}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        try:
            answer = _call(url.path, urllib.parse.parse_qs(url.query))
        except ClientError as err:
            answer = {"Error": err.response["Error"]["Code"]}
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        return


ThreadingHTTPServer(("127.0.0.1", 8080), Handler).serve_forever()
