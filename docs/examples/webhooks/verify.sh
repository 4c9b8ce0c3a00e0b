#!/bin/sh
# Verify a delivery with openssl: verify.sh SECRET WEBHOOK_ID WEBHOOK_TIMESTAMP BODY_FILE
# prints the expected "v1,<base64>"; it must be one of the entries of webhook-signature
# (and the timestamp recent: the receiver's own clock check).
key=$(printf '%s' "${1#whsec_}" | base64 -d | od -An -tx1 | tr -d ' \n')
{ printf '%s.%s.' "$2" "$3"; cat "$4"; } \
  | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$key" -binary | base64 | sed 's/^/v1,/'
