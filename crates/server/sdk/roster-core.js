// Roster's browser SDK. Hand-written, no build step: the server serves this file wrapped as a
// classic script (`/sdk/roster.js`, defines `window.roster`) and as an ES module
// (`/sdk/roster.mjs`). See docs/browser.md.

/**
 * Makes one SDK instance. `defaults.host` is where the script itself was served from, used when
 * `init` is given no `host`.
 */
function createRoster(defaults) {
  'use strict';
  var VERSION = '0.1.0';
  var LIBRARY = 'roster-js';
  // Ids an application passes by mistake (an unset variable printed, a placeholder). Sending them
  // would merge every visitor who hit the same bug into one profile.
  var JUNK_IDS = ['undefined', 'null', 'nil', 'none', 'nan', '0', '-1', 'false', 'true',
    '[object object]', 'anonymous', 'guest', 'unknown'];
  // sendBeacon and keepalive fetches are capped at 64 KiB in flight; stay under it.
  var MAX_KEEPALIVE_BYTES = 60000;

  var config = null; // set by init
  var storage = null;
  var state = null; // { device_id, anonymous_id, distinct_id (the identified user or null) }
  var pending = []; // calls made before init: [method name, arguments]
  var inFlight = {}; // message ids being sent by this page
  var flushTimer = null;
  var retryTimer = null;
  var attempts = 0; // consecutive failed deliveries, for the backoff
  var flushing = null; // the promise of the running flush
  var flags = null; // { name: { enabled, value } } of the current person, once loaded
  var flagsWanted = false; // flags are loaded once asked for, then kept fresh
  var flagsLoading = null;
  var flagListeners = [];
  var initWaiters = [];

  // ---- ids and storage -------------------------------------------------------------------

  function uuid() {
    var c = typeof crypto !== 'undefined' ? crypto : null;
    if (c && typeof c.randomUUID === 'function') return c.randomUUID();
    // randomUUID needs a secure context; getRandomValues does not.
    var b = new Uint8Array(16);
    if (c && c.getRandomValues) c.getRandomValues(b);
    else for (var i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    var h = '';
    for (var j = 0; j < 16; j++) h += (b[j] + 0x100).toString(16).slice(1);
    return h.slice(0, 8) + '-' + h.slice(8, 12) + '-' + h.slice(12, 16) + '-' + h.slice(16, 20) + '-' + h.slice(20);
  }

  function memoryStore() {
    var data = {};
    return {
      kind: 'memory',
      get: function (k) { return Object.prototype.hasOwnProperty.call(data, k) ? data[k] : null; },
      set: function (k, v) { data[k] = v; },
      remove: function (k) { delete data[k]; },
    };
  }

  function localStore() {
    try {
      var ls = window.localStorage;
      var probe = '__roster_probe__';
      ls.setItem(probe, '1');
      ls.removeItem(probe);
      return {
        kind: 'localStorage',
        get: function (k) { try { return ls.getItem(k); } catch (e) { return null; } },
        // A full quota must not break the application: the value then lives for this page only.
        set: function (k, v) { try { ls.setItem(k, v); } catch (e) { /* quota */ } },
        remove: function (k) { try { ls.removeItem(k); } catch (e) { /* blocked */ } },
      };
    } catch (e) {
      return null; // blocked (privacy settings, sandboxed iframe)
    }
  }

  // Cookies hold the ids only: they travel with every request to the site and are small, so the
  // message queue then stays in memory.
  function cookieStore() {
    try {
      if (typeof document === 'undefined' || !navigator.cookieEnabled) return null;
      var memory = memoryStore();
      var secure = location.protocol === 'https:' ? '; Secure' : '';
      var store = {
        kind: 'cookie',
        get: function (k) {
          if (k.slice(-6) === '.queue') return memory.get(k);
          var parts = document.cookie ? document.cookie.split('; ') : [];
          for (var i = 0; i < parts.length; i++) {
            var at = parts[i].indexOf('=');
            if (decodeURIComponent(parts[i].slice(0, at)) === k) return decodeURIComponent(parts[i].slice(at + 1));
          }
          return null;
        },
        set: function (k, v) {
          if (k.slice(-6) === '.queue') return memory.set(k, v);
          document.cookie = encodeURIComponent(k) + '=' + encodeURIComponent(v) +
            '; path=/; max-age=31536000; SameSite=Lax' + secure;
        },
        remove: function (k) {
          if (k.slice(-6) === '.queue') return memory.remove(k);
          document.cookie = encodeURIComponent(k) + '=; path=/; max-age=0; SameSite=Lax' + secure;
        },
      };
      store.set('__roster_probe__', '1');
      var works = store.get('__roster_probe__') === '1';
      store.remove('__roster_probe__');
      return works ? store : null;
    } catch (e) {
      return null;
    }
  }

  function openStorage(kind) {
    if (kind === 'memory') return memoryStore();
    if (kind !== 'cookie') {
      var local = localStore();
      if (local) return local;
    }
    return cookieStore() || memoryStore();
  }

  function readJson(key, fallback) {
    var text = storage.get(key);
    if (!text) return fallback;
    try { return JSON.parse(text); } catch (e) { return fallback; }
  }

  function idsKey() { return config.storagePrefix + '.ids'; }
  function queueKey() { return config.storagePrefix + '.queue'; }

  function saveState() { storage.set(idsKey(), JSON.stringify(state)); }

  function newAnonymousId() { return 'anon-' + uuid(); }

  /** A usable id as a string, or null after saying why it was refused. */
  function cleanId(value, what) {
    if (typeof value === 'number' && isFinite(value)) value = String(value);
    if (typeof value !== 'string' || JUNK_IDS.indexOf(value.trim().toLowerCase()) >= 0 || !value.trim()) {
      console.error('[roster] ' + what + ' refused: ' + JSON.stringify(value === undefined ? 'undefined' : value) +
        ' is not a usable id (pass your stable internal user id)');
      return null;
    }
    return value.trim();
  }

  // ---- messages, queue and delivery ------------------------------------------------------

  function pageInfo() {
    if (typeof location === 'undefined') return {};
    return {
      url: location.href,
      path: location.pathname,
      referrer: typeof document !== 'undefined' ? document.referrer : '',
      title: typeof document !== 'undefined' ? document.title : '',
    };
  }

  function context() {
    var ctx = {
      library: { name: LIBRARY, version: VERSION },
      page: pageInfo(),
      device: { id: state.device_id },
    };
    if (typeof navigator !== 'undefined') {
      ctx.userAgent = navigator.userAgent;
      ctx.locale = navigator.language;
    }
    return ctx;
  }

  /** Adds one message (`type` is identify, track or alias: the endpoint) to the queue. */
  function enqueue(type, body) {
    body.message_id = uuid();
    body.timestamp = new Date().toISOString();
    body.context = context();
    if (config.environment) body.environment = config.environment;
    var queue = readJson(queueKey(), []);
    queue.push({ type: type, body: body });
    if (queue.length > config.maxQueueSize) {
      var dropped = queue.splice(0, queue.length - config.maxQueueSize);
      console.warn('[roster] queue full: dropped the ' + dropped.length + ' oldest message(s)');
    }
    storage.set(queueKey(), JSON.stringify(queue));
    var waiting = queue.length - Object.keys(inFlight).length;
    if (waiting >= config.flushAt) flush();
    else if (!flushTimer && !retryTimer) flushTimer = setTimeout(function () { flushTimer = null; flush(); }, config.flushInterval);
  }

  /** Removes delivered (or dropped) messages from the stored queue. */
  function removeFromQueue(ids) {
    var gone = {};
    ids.forEach(function (id) { gone[id] = true; delete inFlight[id]; });
    var queue = readJson(queueKey(), []).filter(function (m) { return !gone[m.body.message_id]; });
    storage.set(queueKey(), JSON.stringify(queue));
  }

  /** The next batch to send: the oldest messages not in flight, of one type, in order. */
  function nextBatch(limit) {
    var queue = readJson(queueKey(), []).filter(function (m) { return !inFlight[m.body.message_id]; });
    var batch = [];
    for (var i = 0; i < queue.length && batch.length < limit; i++) {
      // Types are sent in the order they were called (an identify before the tracks after it).
      if (batch.length && queue[i].type !== batch[0].type) break;
      batch.push(queue[i]);
    }
    return batch;
  }

  function endpoint(path) { return config.host + path; }

  /**
   * Sends queued messages, one batch at a time, until the queue is empty or a delivery fails.
   * Resolves when done; never rejects.
   */
  function flush() {
    if (!config) return Promise.resolve();
    if (flushTimer) { clearTimeout(flushTimer); flushTimer = null; }
    if (flushing) return flushing;
    flushing = (function next() {
      var batch = nextBatch(config.flushAt);
      if (!batch.length) return Promise.resolve(true);
      var ids = batch.map(function (m) { return m.body.message_id; });
      ids.forEach(function (id) { inFlight[id] = true; });
      var text = JSON.stringify(batch.map(function (m) { return m.body; }));
      return fetch(endpoint('/' + batch[0].type), {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', 'X-API-Key': config.clientKey },
        body: text,
        // Lets the request finish if the page goes away meanwhile.
        keepalive: text.length < MAX_KEEPALIVE_BYTES,
        credentials: 'omit',
      }).then(function (response) {
        if (response.ok) {
          removeFromQueue(ids);
          attempts = 0;
          return next();
        }
        if (response.status === 429 || response.status >= 500) throw new Error('HTTP ' + response.status);
        // Any other 4xx will not get better by resending (a 400 batch had its valid items applied).
        return response.text().then(function (detail) {
          console.warn('[roster] ' + batch.length + ' message(s) refused by the server (HTTP ' +
            response.status + '), dropped: ' + detail);
          removeFromQueue(ids);
          return next();
        });
      }).catch(function () {
        ids.forEach(function (id) { delete inFlight[id]; });
        scheduleRetry();
        return false;
      });
    })().then(function (done) {
      flushing = null;
      return done;
    });
    return flushing;
  }

  // Exponential backoff with jitter: 0.5 s, 1 s, 2 s ... up to 30 s. Coming back online retries
  // at once.
  function scheduleRetry() {
    attempts++;
    if (retryTimer) return;
    var delay = Math.min(30000, 500 * Math.pow(2, attempts - 1)) * (0.75 + Math.random() / 2);
    retryTimer = setTimeout(function () { retryTimer = null; flush(); }, delay);
  }

  function retryNow() {
    if (retryTimer) { clearTimeout(retryTimer); retryTimer = null; }
    attempts = 0;
    flush();
  }

  // When the page is hidden or closing, messages still waiting (not already in a keepalive fetch)
  // go out as beacons. A beacon cannot set headers: the key travels as `?apiKey=` and the body as
  // text/plain (a type that needs no CORS preflight).
  function sendBeacons() {
    if (!config || typeof navigator === 'undefined' || typeof navigator.sendBeacon !== 'function') return;
    // Offline, a beacon would be lost; the stored queue is sent on the next visit instead.
    if (navigator.onLine === false) return;
    if (flushTimer) { clearTimeout(flushTimer); flushTimer = null; }
    for (;;) {
      var batch = nextBatch(config.flushAt);
      if (!batch.length) return;
      // Shrink the batch until it fits a beacon.
      var text;
      while ((text = JSON.stringify(batch.map(function (m) { return m.body; }))).length > MAX_KEEPALIVE_BYTES && batch.length > 1) {
        batch = batch.slice(0, Math.ceil(batch.length / 2));
      }
      var url = endpoint('/' + batch[0].type) + '?apiKey=' + encodeURIComponent(config.clientKey);
      if (!navigator.sendBeacon(url, new Blob([text], { type: 'text/plain' }))) return; // kept for later
      // The browser owns the request now; the server's message_id dedup covers a resend.
      removeFromQueue(batch.map(function (m) { return m.body.message_id; }));
    }
  }

  function listen() {
    if (typeof window === 'undefined' || !window.addEventListener) return;
    window.addEventListener('pagehide', sendBeacons);
    document.addEventListener('visibilitychange', function () {
      if (document.visibilityState === 'hidden') sendBeacons();
    });
    window.addEventListener('online', retryNow);
  }

  // ---- flags -------------------------------------------------------------------------------

  function loadFlags() {
    flagsWanted = true;
    if (!config) return whenInitialized().then(loadFlags);
    // Flags are evaluated on the stored traits: let the identify reach the server first.
    var load = flush().then(function () {
      var body = state.distinct_id ? { distinct_id: state.distinct_id } : { anonymous_id: state.anonymous_id };
      if (config.environment) body.environment = config.environment;
      return fetch(endpoint('/v1/flags'), {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', 'X-API-Key': config.clientKey },
        body: JSON.stringify(body),
        credentials: 'omit',
      });
    }).then(function (response) {
      if (!response.ok) throw new Error('flags: HTTP ' + response.status);
      return response.json();
    }).then(function (answer) {
      var loaded = {};
      (answer.flags || []).forEach(function (f) { loaded[f.feature] = { enabled: !!f.enabled, value: f.value }; });
      if (load === flagsLoading) {
        flags = loaded;
        flagsLoading = null;
        flagListeners.slice().forEach(function (listener) {
          try { listener(loaded); } catch (e) { console.error('[roster] onFlags listener failed', e); }
        });
      }
      return loaded;
    }, function (error) {
      if (load === flagsLoading) flagsLoading = null;
      console.warn('[roster] could not load flags: ' + error.message);
      return flags || {};
    });
    flagsLoading = load;
    return load;
  }

  function refreshFlags() {
    if (flagsWanted) loadFlags();
  }

  function whenInitialized() {
    return new Promise(function (resolve) { initWaiters.push(resolve); });
  }

  // ---- the public API ----------------------------------------------------------------------

  // Calls made before `init` wait, in order, and run once it has been called.
  function queued(name, method) {
    return function () {
      if (!config) { pending.push([name, arguments]); return; }
      return method.apply(null, arguments);
    };
  }

  var api = {
    version: VERSION,

    init: function (clientKey, options) {
      if (config) { console.warn('[roster] init called twice; ignored'); return api; }
      if (typeof clientKey !== 'string' || !clientKey) { console.error('[roster] init needs the client key'); return api; }
      options = options || {};
      var host = options.host || (defaults && defaults.host) || '';
      config = {
        clientKey: clientKey,
        environment: options.environment || null,
        host: host.replace(/\/+$/, ''),
        flushAt: Math.max(1, options.flushAt || 20),
        flushInterval: options.flushInterval != null ? options.flushInterval : 500,
        maxQueueSize: options.maxQueueSize || 1000,
        storagePrefix: options.storagePrefix || 'roster',
      };
      storage = openStorage(options.persistence);
      state = readJson(idsKey(), null) || {};
      if (!state.device_id) state.device_id = 'device-' + uuid();
      if (!state.anonymous_id) state.anonymous_id = newAnonymousId();
      state.distinct_id = state.distinct_id || null;
      saveState();
      listen();
      var calls = pending;
      pending = [];
      calls.forEach(function (call) { api[call[0]].apply(null, call[1]); });
      initWaiters.splice(0).forEach(function (resolve) { resolve(); });
      // Messages left by an earlier visit (offline, closed mid-send) go out now.
      if (readJson(queueKey(), []).length) flush();
      return api;
    },

    identify: queued('identify', function (userId, traits) {
      var id = cleanId(userId, 'identify');
      if (!id) return;
      // Another user on this browser: start a fresh anonymous session so the two never merge.
      if (state.distinct_id && state.distinct_id !== id) resetIds(false);
      state.distinct_id = id;
      saveState();
      enqueue('identify', { distinct_id: id, anonymous_id: state.anonymous_id, traits: traits || {} });
      refreshFlags();
    }),

    track: queued('track', function (event, properties) {
      if (typeof event !== 'string' || !event.trim()) { console.error('[roster] track needs an event name'); return; }
      var body = { event: event, anonymous_id: state.anonymous_id, properties: properties || {} };
      if (state.distinct_id) body.distinct_id = state.distinct_id;
      enqueue('track', body);
    }),

    page: queued('page', function (name, properties) {
      if (name && typeof name === 'object') { properties = name; name = null; }
      var props = pageInfo();
      if (name) props.name = name;
      for (var key in properties || {}) props[key] = properties[key];
      api.track('$pageview', props);
    }),

    alias: queued('alias', function (newId) {
      var id = cleanId(newId, 'alias');
      if (!id) return;
      enqueue('alias', { previous_id: state.distinct_id || state.anonymous_id, distinct_id: id });
      state.distinct_id = id;
      saveState();
      refreshFlags();
    }),

    reset: queued('reset', function (options) {
      resetIds(!!(options && options.resetDeviceId));
      refreshFlags();
    }),

    /** Delivers what is queued now; resolves to true when the queue is empty. */
    flush: function () { return config ? flush() : whenInitialized().then(flush); },

    /** Loads the current person's flags: a promise of `{ name: { enabled, value } }`. */
    getFlags: function () {
      if (flagsLoading) return flagsLoading;
      if (flags) return Promise.resolve(flags);
      return loadFlags();
    },

    isEnabled: function (name) { return !!(flags && flags[name] && flags[name].enabled); },

    getValue: function (name) { return flags && flags[name] ? flags[name].value : undefined; },

    /** Calls `listener(flags)` each time flags load (after init, identify, alias, reset). */
    onFlags: function (listener) {
      flagListeners.push(listener);
      if (flags) listener(flags);
      else if (!flagsLoading) loadFlags();
      return function () { flagListeners = flagListeners.filter(function (l) { return l !== listener; }); };
    },

    getDistinctId: function () { return state ? state.distinct_id || state.anonymous_id : null; },
    getAnonymousId: function () { return state ? state.anonymous_id : null; },
    getDeviceId: function () { return state ? state.device_id : null; },
  };

  function resetIds(resetDevice) {
    state.anonymous_id = newAnonymousId();
    state.distinct_id = null;
    if (resetDevice) state.device_id = 'device-' + uuid();
    flags = null;
    saveState();
  }

  return api;
}
