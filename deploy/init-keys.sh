#!/bin/sh
# One-shot step of the local stack: make sure the demo subscription exists in the
# key store both replicas read (a shared volume), and print a key and the curl to
# try. A key is shown only when it is issued, so every run issues a fresh primary
# key (the previous one stops working) rather than leave you without one.
set -eu

: "${APIM_SUBSCRIPTION_KEYS_FILE:?APIM_SUBSCRIPTION_KEYS_FILE must name the key store}"
name="${DEMO_SUBSCRIPTION:-demo}"
product="${DEMO_PRODUCT:-demo}"
limit="${DEMO_RATE_LIMIT:-10/60}"
api_url="${DEMO_API_URL:-http://localhost:8080}"

field() {
  python -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

if issued=$(python -m service keys regenerate --name "$name" --which primary \
    --json 2>/dev/null); then
  key=$(printf '%s' "$issued" | field key)
  echo "Subscription '$name' exists; its primary key was regenerated."
else
  issued=$(python -m service keys add --name "$name" --product "$product" \
    --rate-limit "$limit" --json)
  key=$(printf '%s' "$issued" | field primary)
  echo "Subscription '$name' created in product '$product', rate limit $limit."
fi

echo "Subscription key: $key"
echo "Get a token from the idp (see its client id and secret with"
echo "'docker compose logs idp'), put it in TOKEN, then call the API:"
echo "curl -s $api_url/api/v2/health -H \"Authorization: Bearer \$TOKEN\"" \
  "-H \"Ocp-Apim-Subscription-Key: $key\""
