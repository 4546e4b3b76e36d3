// Drives the vendors' Node SDKs against a Roster server and prints what they saw as JSON.
// Usage: node sdks.js BASE_URL CLIENT_KEY SERVER_KEY
'use strict';

const { Analytics } = require('@segment/analytics-node');
const { Flagsmith } = require('flagsmith-nodejs');

async function segment(baseUrl, writeKey) {
  const errors = [];
  const analytics = new Analytics({ writeKey, host: baseUrl, maxEventsInBatch: 1, maxRetries: 0 });
  analytics.on('error', (error) => errors.push(String(error && (error.reason || error.message || error))));
  const sent = [
    ['track', { anonymousId: 'node-anon', event: 'Viewed Pricing', properties: { tier: 'pro' } }],
    ['identify', { userId: 'node-user', traits: { email: 'node@example.com', plan: 'pro' } }],
    ['identify', { userId: 'node-user', traits: { plan: 'team' } }],
    ['alias', { previousId: 'node-anon', userId: 'node-user' }],
    ['track', { userId: 'node-user', event: 'Checkout', properties: { total: 9.5 } }],
  ];
  for (const [method, message] of sent) {
    // One at a time, so the server sees them in order.
    await new Promise((resolve) => analytics[method](message, (error) => {
      if (error) errors.push(String(error.reason || error.message || error));
      resolve();
    }));
  }
  await analytics.closeAndFlush();
  return errors;
}

async function flagsmith(baseUrl, clientKey, serverKey) {
  const apiUrl = `${baseUrl}/api/v1/`;
  const state = (flags) => ({ enabled: flags.isFeatureEnabled('checkout'), value: flags.getFeatureValue('checkout') });
  const remote = new Flagsmith({ environmentKey: clientKey, apiUrl });
  const seen = {
    environment: state(await remote.getEnvironmentFlags()),
    pro: state(await remote.getIdentityFlags('node-ada', { plan: 'pro' })),
    downgraded: state(await remote.getIdentityFlags('node-ada', { plan: 'free' })),
    vip: state(await remote.getIdentityFlags('vip')),
  };
  const local = new Flagsmith({ environmentKey: serverKey, apiUrl, enableLocalEvaluation: true, environmentRefreshIntervalSeconds: 60 });
  seen.local_pro = state(await local.getIdentityFlags('node-bob', { plan: 'pro' }));
  seen.local_vip = state(await local.getIdentityFlags('vip'));
  local.close && local.close();
  return seen;
}

async function main() {
  const [baseUrl, clientKey, serverKey] = process.argv.slice(2);
  const result = { segment_errors: await segment(baseUrl, clientKey), flagsmith: await flagsmith(baseUrl, clientKey, serverKey) };
  process.stdout.write(JSON.stringify(result));
  process.exit(0);
}

main().catch((error) => {
  process.stderr.write(String(error && error.stack ? error.stack : error));
  process.exit(1);
});
