// Verify a delivery from django-timely-orders (Standard Webhooks) in Node, no package:
// HMAC-SHA256 of "<webhook-id>.<webhook-timestamp>.<raw body>" with the endpoint's secret
// (base64 after "whsec_"), compared with each "v1,<base64>" of webhook-signature.
const crypto = require("node:crypto");

function verify(secret, headers, rawBody, toleranceSeconds = 300) {
  const id = headers["webhook-id"], timestamp = headers["webhook-timestamp"];
  if (Math.abs(Date.now() / 1000 - Number(timestamp)) > toleranceSeconds) return false;
  const key = Buffer.from(secret.replace(/^whsec_/, ""), "base64");
  const expected = crypto.createHmac("sha256", key)
    .update(`${id}.${timestamp}.${rawBody}`).digest();
  return headers["webhook-signature"].split(" ").some((entry) => {
    const [version, signature] = entry.split(",");
    const given = Buffer.from(signature ?? "", "base64");
    return version === "v1" && given.length === expected.length
      && crypto.timingSafeEqual(given, expected);
  });
}

module.exports = { verify };
