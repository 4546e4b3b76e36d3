// Classic-script wrapper (`/sdk/roster.js`): the core above runs inside a function, so only
// `window.roster` is defined.
var script = document.currentScript;
var roster = createRoster({ host: script && script.src ? new URL(script.src).origin : '' });
roster.createRoster = createRoster;
// A page may queue calls before this script loads:
//   window.roster = window.roster || []; roster.push(['init', 'CLIENT_KEY', {...}]);
var stub = window.roster;
window.roster = roster;
if (Array.isArray(stub)) {
  stub.forEach(function (call) { roster[call[0]].apply(roster, call.slice(1)); });
}
