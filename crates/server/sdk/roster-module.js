// ES module wrapper (`/sdk/roster.mjs`): `import roster, { createRoster } from '…/sdk/roster.mjs'`.
const roster = createRoster({ host: new URL(import.meta.url).origin });
export default roster;
export { createRoster };
