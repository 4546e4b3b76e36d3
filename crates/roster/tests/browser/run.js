// Drives Debian's chromium (through playwright-core, no browser download) against a running
// Roster. Test pages and vendor bundles are served from http://localhost:PORT by this script, while
// Roster listens on http://127.0.0.1:PORT: another origin, so every call to Roster is cross-origin
// and goes through the server's own CORS answers (nothing is intercepted).
//
//   node run.js roster|vendors ROSTER_URL CLIENT_KEY
//
// Prints one JSON object: what each scenario saw in the page. The Rust test (tests/it/browser.rs)
// then checks what Roster stored.

'use strict';
const http = require('http');
const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const [suite, rosterUrl, clientKey] = process.argv.slice(2);
const modules = path.join(__dirname, 'node_modules');
// Where each vendor's browser build lives; chunks they load lazily are served from the same folder.
const vendorDirs = {
  segment: path.join(modules, '@segment/analytics-next/dist/umd'),
  cdp: path.join(modules, '@customerio/cdp-analytics-browser/dist/umd'),
};

function page(body) {
  return `<!doctype html><html><head><meta charset="utf-8"><title>Roster browser test</title></head>
<body><h1>test</h1>${body}</body></html>`;
}

const pages = {
  // `flushInterval` comes from the query string: the beacon scenario needs messages still waiting.
  '/roster.html': (query) => page(`<script src="${rosterUrl}/sdk/roster.js"></script>
<script>roster.init(${JSON.stringify(clientKey)}, { environment: 'development',
  flushInterval: ${Number(query.get('flushInterval') || 50)} });</script>`),
  '/module.html': () => page(`<script type="module">
import roster, { createRoster } from '${rosterUrl}/sdk/roster.mjs';
window.roster = roster;
window.rosterModule = { createRoster: typeof createRoster };
roster.init(${JSON.stringify(clientKey)}, { environment: 'development', flushInterval: 50 });
</script>`),
  // Calls queued before the script loads (the stub array) and before init.
  '/early.html': () => page(`<script>window.roster = [['track', 'Queued Before Load']];</script>
<script src="${rosterUrl}/sdk/roster.js"></script>
<script>roster.identify('browser-early', { plan: 'free' });
roster.init(${JSON.stringify(clientKey)}, { environment: 'development', flushInterval: 50 });</script>`),
  '/segment.html': () => page('<script src="/vendor/segment/index.js"></script>'),
  '/cdp.html': () => page('<script src="/vendor/cdp/index.js"></script>'),
  '/flagsmith.html': () => page('<script src="/vendor/flagsmith.js"></script>'),
};

function serve(request, response) {
  const url = new URL(request.url, 'http://localhost');
  if (pages[url.pathname]) {
    response.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
    return response.end(pages[url.pathname](url.searchParams));
  }
  let file = null;
  const vendor = url.pathname.match(/^\/vendor\/(segment|cdp)\/(?:.*\/)?([\w.-]+\.js)$/);
  if (vendor) file = path.join(vendorDirs[vendor[1]], vendor[2]);
  if (url.pathname === '/vendor/flagsmith.js') file = path.join(modules, 'flagsmith/index.js');
  if (file && fs.existsSync(file)) {
    response.writeHead(200, { 'Content-Type': 'text/javascript; charset=utf-8' });
    return response.end(fs.readFileSync(file));
  }
  if (url.pathname === '/favicon.ico') return response.writeHead(204).end();
  response.writeHead(404);
  response.end('not found');
}

// Closes a page as a user would (pagehide and unload run); with runBeforeUnload, close() itself
// does not wait for that.
async function closePage(p) {
  const closed = p.waitForEvent('close');
  await p.close({ runBeforeUnload: true });
  await closed;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  const server = http.createServer(serve);
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  // `localhost` and `127.0.0.1` are different origins for the browser.
  const origin = `http://localhost:${server.address().port}`;
  const browser = await chromium.launch({
    executablePath: process.env.ROSTER_CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
  // http_errors: every answer >= 400 a page got, to say what a vendor sent that Roster refused.
  const out = { console_errors: {}, console_warnings: {}, page_errors: [], http_errors: [] };
  // Each scenario gets a fresh context (fresh storage: a new browser profile).
  async function scenario(name, body) {
    const context = await browser.newContext();
    const errors = (out.console_errors[name] = []);
    const warnings = (out.console_warnings[name] = []);
    context.on('page', (p) => {
      p.on('console', (message) => {
        if (message.type() === 'error') errors.push(message.text());
        if (message.type() === 'warning') warnings.push(message.text());
      });
      p.on('pageerror', (error) => out.page_errors.push(`${name}: ${error.message}`));
      p.on('response', (response) => {
        if (response.status() >= 400) {
          const request = response.request();
          out.http_errors.push(`${name}: ${response.status()} ${request.method()} ${request.url()} ${request.postData() || ''}`.slice(0, 600));
        }
      });
    });
    try {
      out[name] = await body(context);
    } catch (error) {
      out[name] = { failed: String(error && error.stack || error) };
    }
    await context.close();
  }
  async function open(context, pathname) {
    const p = await context.newPage();
    await p.goto(origin + pathname);
    await p.waitForFunction(() => window.roster && window.roster.getAnonymousId && window.roster.getAnonymousId());
    return p;
  }
  const ids = (p) => p.evaluate(() => ({
    anonymous_id: roster.getAnonymousId(), device_id: roster.getDeviceId(), distinct_id: roster.getDistinctId(),
  }));

  if (suite === 'roster') await rosterScenarios(scenario, open, ids);
  else await vendorScenarios(scenario, origin);

  await browser.close();
  server.close();
  process.stdout.write(JSON.stringify(out));
}

async function rosterScenarios(scenario, open, ids) {
  // A page closing with messages still waiting for their batch: they leave as beacons.
  await scenario('beacon', async (context) => {
    const p = await open(context, '/roster.html?flushInterval=60000');
    await p.evaluate(() => {
      roster.identify('beacon-user');
      for (let i = 1; i <= 3; i++) roster.track('Before Close', { n: i });
    });
    const queued = await p.evaluate(() => JSON.parse(localStorage.getItem('roster.queue')).length);
    await closePage(p);
    return { queued_when_closed: queued };
  });

  // Anonymous activity, then login: flags before and after, the pre-login events linked.
  await scenario('link', async (context) => {
    const p = await open(context, '/roster.html');
    return p.evaluate(async () => {
      const seen = { flag_loads: 0 };
      roster.onFlags(() => { seen.flag_loads++; });
      roster.page();
      roster.track('Viewed Pricing', { plan: 'pro' });
      const before = await roster.getFlags();
      seen.anonymous_id = roster.getAnonymousId();
      seen.before = { flags: before.checkout, enabled: roster.isEnabled('checkout'), value: roster.getValue('checkout') };
      roster.identify('browser-ada', { plan: 'pro', email: 'ada@example.com' });
      const after = await roster.getFlags();
      seen.after = { flags: after.checkout, enabled: roster.isEnabled('checkout'), value: roster.getValue('checkout') };
      roster.track('Checkout', { total: 49.99 });
      seen.delivered = await roster.flush();
      seen.distinct_id = roster.getDistinctId();
      return seen;
    });
  });

  // Ids survive a reload; reset renews the anonymous id (and the device id when asked).
  await scenario('reload', async (context) => {
    const p = await open(context, '/roster.html');
    const first = await ids(p);
    await p.reload();
    await p.waitForFunction(() => window.roster && roster.getAnonymousId());
    const reloaded = await ids(p);
    await p.evaluate(() => roster.reset());
    const reset = await ids(p);
    await p.evaluate(() => roster.reset({ resetDeviceId: true }));
    const resetDevice = await ids(p);
    return { first, reloaded, reset, reset_device: resetDevice };
  });

  // Two users log in one after the other on one browser, without a reset in between.
  await scenario('two_users', async (context) => {
    const p = await open(context, '/roster.html');
    return p.evaluate(async () => {
      roster.identify('browser-bob');
      roster.track('Bob Event');
      const bob = roster.getAnonymousId();
      roster.identify('browser-carol');
      roster.track('Carol Event');
      const carol = roster.getAnonymousId();
      return { bob_anonymous_id: bob, carol_anonymous_id: carol, delivered: await roster.flush() };
    });
  });

  // Offline: messages wait (retried with backoff) and arrive once the network is back, on the
  // same page and, from the stored queue, on the next visit after the page was closed offline.
  await scenario('offline', async (context) => {
    let p = await open(context, '/roster.html');
    await p.evaluate(() => { roster.identify('browser-dave'); return roster.flush(); });
    await context.setOffline(true);
    const whileOffline = await p.evaluate(() => { roster.track('Offline One'); return roster.flush(); });
    await sleep(1500); // a few failed retries
    const onLine = await p.evaluate(() => navigator.onLine);
    await context.setOffline(false);
    const back = await p.evaluate(() => roster.flush());
    await context.setOffline(true);
    await p.evaluate(() => { roster.track('Offline Two'); return roster.flush(); });
    const stored = await p.evaluate(() => JSON.parse(localStorage.getItem('roster.queue')).length);
    // A blank tab keeps the context open while the page closes (its last page closing ends it).
    const keeper = await context.newPage();
    await closePage(p);
    await context.setOffline(false);
    p = await open(context, '/roster.html');
    await keeper.close();
    const nextVisit = await p.evaluate(() => roster.flush());
    return { while_offline: whileOffline, on_line_while_offline: onLine, back, stored_when_closed: stored, next_visit: nextVisit };
  });

  // Ids an application passes by mistake are refused in the browser.
  await scenario('junk', async (context) => {
    const p = await open(context, '/roster.html');
    return p.evaluate(async () => {
      [undefined, null, '', '   ', 'undefined', 'null', '0'].forEach((id) => roster.identify(id));
      roster.track('After Junk');
      return { distinct_id: roster.getDistinctId(), delivered: await roster.flush() };
    });
  });

  // A message Roster refuses (an event name past the key limit) is dropped, not retried; its
  // batch neighbour was applied.
  await scenario('refused', async (context) => {
    const p = await open(context, '/roster.html');
    return p.evaluate(async () => {
      roster.track('x'.repeat(300));
      roster.track('After Refused');
      const delivered = await roster.flush();
      return { delivered, queued: JSON.parse(localStorage.getItem('roster.queue')).length };
    });
  });

  await scenario('early', async (context) => {
    const p = await open(context, '/early.html');
    return p.evaluate(async () => ({ distinct_id: roster.getDistinctId(), delivered: await roster.flush() }));
  });

  // The ES module build.
  await scenario('module', async (context) => {
    const p = await open(context, '/module.html');
    return p.evaluate(async () => {
      roster.identify('browser-esm', { plan: 'free' });
      return { exports: window.rosterModule, delivered: await roster.flush() };
    });
  });
}

async function vendorScenarios(scenario, origin) {
  const rosterHost = new URL(rosterUrl).host; // 127.0.0.1:PORT, what the vendors call apiHost

  // Segment's analytics-next (its standalone build), with only the host changed. cdnSettings
  // stand in for the settings it would fetch from Segment's CDN.
  await scenario('segment', async (context) => {
    const p = await context.newPage();
    await p.goto(origin + '/segment.html');
    return p.evaluate(async ({ key, host, cdn }) => {
      const [analytics] = await window.AnalyticsNext.AnalyticsBrowser.load(
        { writeKey: key, cdnURL: cdn,
          cdnSettings: { integrations: { 'Segment.io': { apiKey: key, apiHost: host + '/v1', protocol: 'http' } } } },
        { retryQueue: true });
      await analytics.page('Pricing');
      await analytics.track('Viewed Pricing', { plan: 'pro' });
      await analytics.identify('browser-segment', { plan: 'pro' });
      await analytics.track('Checkout', { total: 10 });
      return { anonymous_id: analytics.user().anonymousId() };
    }, { key: clientKey, host: rosterHost, cdn: origin + '/vendor/segment' });
  });

  // Customer.io's fork of analytics-next, pointed at Roster: identify, track, a device event.
  await scenario('customerio', async (context) => {
    const p = await context.newPage();
    await p.goto(origin + '/cdp.html');
    return p.evaluate(async ({ key, host, cdn }) => {
      const [analytics] = await window.AnalyticsNext.AnalyticsBrowser.load(
        { writeKey: key, cdnURL: cdn,
          cdnSettings: { integrations: { 'Customer.io Data Pipelines': { apiKey: key, apiHost: host + '/v1', protocol: 'http' } } } });
      await analytics.track('Viewed Pricing');
      await analytics.identify('browser-cio', { email: 'cio@example.com', plan: 'team' });
      await analytics.track('Checkout');
      await analytics.track('Device Created or Updated', { device: { token: 'browser-cio-token', type: 'web' } },
        { context: { device: { token: 'browser-cio-token', type: 'web' } } });
      return { anonymous_id: analytics.user().anonymousId() };
    }, { key: clientKey, host: rosterHost, cdn: origin + '/vendor/cdp' });
  });

  // Flagsmith's JavaScript client: environment flags, then an identity with a trait that puts it
  // in a segment.
  await scenario('flagsmith', async (context) => {
    const p = await context.newPage();
    await p.goto(origin + '/flagsmith.html');
    return p.evaluate(async ({ key, api }) => {
      const flagsmith = window.flagsmith || window.index.default;
      const state = () => ({ enabled: flagsmith.hasFeature('checkout'), value: flagsmith.getValue('checkout') });
      await flagsmith.init({ environmentID: key, api, cacheFlags: false, enableAnalytics: false });
      const before = state();
      await flagsmith.identify('browser-flagsmith', { plan: 'pro' });
      const identified = state();
      await flagsmith.setTrait('plan', 'free');
      const downgraded = state();
      return { before, identified, downgraded };
    }, { key: clientKey, api: rosterUrl + '/api/v1/' });
  });
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
