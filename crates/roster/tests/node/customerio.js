// Drives Customer.io's Node client (customerio-node) against a Roster server.
// Usage: node customerio.js BASE_URL SITE_ID API_KEY
//
// customerio-node sends over `https.request` only, so it cannot reach a plain-HTTP server. As a
// user would, it is pointed (`url` option) at a TLS endpoint in front of Roster: here a small
// HTTPS proxy with a throwaway self-signed certificate (made with the openssl CLI), trusted by
// running with NODE_TLS_REJECT_UNAUTHORIZED=0.
'use strict';

const { execFileSync } = require('child_process');
const fs = require('fs');
const http = require('http');
const https = require('https');
const os = require('os');
const path = require('path');
const { TrackClient } = require('customerio-node');

function tlsProxy(target) {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'roster-tls-'));
  const key = path.join(directory, 'key.pem');
  const cert = path.join(directory, 'cert.pem');
  execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert,
    '-days', '1', '-subj', '/CN=127.0.0.1'], { stdio: 'ignore' });
  const upstream = new URL(target);
  const server = https.createServer({ key: fs.readFileSync(key), cert: fs.readFileSync(cert) }, (request, response) => {
    const forwarded = http.request({ host: upstream.hostname, port: upstream.port, path: request.url,
      method: request.method, headers: request.headers }, (answer) => {
      response.writeHead(answer.statusCode, answer.headers);
      answer.pipe(response);
    });
    forwarded.on('error', (error) => { response.writeHead(502); response.end(String(error)); });
    request.pipe(forwarded);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)));
}

async function main() {
  const [baseUrl, siteId, apiKey] = process.argv.slice(2);
  const proxy = await tlsProxy(baseUrl);
  // The client takes the host and path from `url` but the port from its request options.
  const port = proxy.address().port;
  const cio = new TrackClient(siteId, apiKey, { url: `https://127.0.0.1:${port}/api/v1`, port });
  const errors = [];
  const calls = [
    () => cio.trackAnonymous('node-cio-anon', { name: 'Viewed Pricing', data: { tier: 'pro' } }),
    () => cio.identify('node-cio', { email: 'node-cio@example.com', plan: 'pro' }),
    () => cio.identify('node-cio', { plan: 'team', anonymous_id: 'node-cio-anon' }),
    () => cio.track('node-cio', { name: 'Checkout', data: { total: 5 } }),
    () => cio.addDevice('node-cio', 'fcm-node', 'android', { app_version: '3.0' }),
  ];
  for (const call of calls) {
    try {
      await call();
    } catch (error) {
      errors.push(String(error && error.message ? error.message : error));
    }
  }
  proxy.close();
  process.stdout.write(JSON.stringify({ errors }));
  process.exit(0);
}

main().catch((error) => {
  process.stderr.write(String(error && error.stack ? error.stack : error));
  process.exit(1);
});
