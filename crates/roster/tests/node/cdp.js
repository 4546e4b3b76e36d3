// Drives Customer.io's Data Pipelines Node SDK (`@customerio/cdp-analytics-node`, unchanged but for
// its host) against Roster, including the semantic events that act on devices and people.
// Usage: node cdp.js BASE_URL CLIENT_KEY SERVER_KEY; prints the errors the SDK reported as JSON.
'use strict';

const { Analytics } = require('@customerio/cdp-analytics-node');

async function send(analytics, calls, errors) {
  for (const [method, message] of calls) {
    // One at a time, so the server sees them in order.
    await new Promise((resolve) => analytics[method](message, (error) => {
      if (error) errors.push(String(error.reason || error.message || error));
      resolve();
    }));
  }
  await analytics.closeAndFlush();
}

function client(baseUrl, writeKey, errors) {
  const analytics = new Analytics({ writeKey, host: baseUrl, maxEventsInBatch: 1, maxRetries: 0 });
  analytics.on('error', (error) => errors.push(String(error && (error.reason || error.message || error))));
  return analytics;
}

async function main() {
  const [baseUrl, clientKey, serverKey] = process.argv.slice(2);
  const errors = [];
  const device = { token: 'fcm-node-1', type: 'android', model: 'Pixel 8' };
  // What a mobile or web app sends with the public key.
  await send(client(baseUrl, clientKey, errors), [
    ['identify', { userId: 'cdp-user', traits: { email: 'cdp@example.com', plan: 'pro' } }],
    ['track', { userId: 'cdp-user', event: 'Device Created or Updated',
      context: { device, network: { wifi: true } }, properties: { push_enabled: true } }],
    ['track', { userId: 'cdp-user', event: 'Opened App', context: { device: { token: 'fcm-node-1' } } }],
    ['track', { userId: 'cdp-user', event: 'Device Created or Updated',
      context: { device: { token: 'fcm-node-2', type: 'ios' } } }],
    ['track', { userId: 'cdp-user', event: 'Device Deleted', context: { device: { token: 'fcm-node-2' } } }],
  ], errors);
  // What a backend sends with the secret key.
  await send(client(baseUrl, serverKey, errors), [
    ['identify', { userId: 'cdp-gone', traits: { plan: 'free' } }],
    ['track', { userId: 'cdp-gone', event: 'User Deleted' }],
    ['track', { userId: 'cdp-quiet', event: 'User Suppressed' }],
  ], errors);
  process.stdout.write(JSON.stringify({ errors }));
  process.exit(0);
}

main().catch((error) => {
  process.stderr.write(String(error && error.stack ? error.stack : error));
  process.exit(1);
});
