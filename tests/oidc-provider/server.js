// A real, independent OpenID provider for tests/oidc_provider.rs: the npm package `oidc-provider`
// (pinned in package.json / package-lock.json, installed by install.sh), configured for the
// client-credentials grant with RS256 JWT access tokens (RFC 9068) for resource servers named by
// resource indicators (RFC 8707).
//
// Usage: node server.js [PORT]     (or OIDC_PROVIDER_PORT; default 0 = any free port)
//
// Listens on 127.0.0.1 only. When listening it prints one line on stdout:
//
//   READY http://127.0.0.1:PORT oidc-provider/VERSION
//
// (the second field is the issuer identifier, also what discovery and every token's `iss` say), and
// it exits when its standard input closes, so it never outlives the process that started it.
//
// Clients (client_secret_basic, client_credentials only); `roles` is added to their access tokens
// through `extraTokenClaims`:
//   orders-service / orders-secret     roles [S2SAppRole]
//   billing-service / billing-secret   roles []            (on the test's allowlist, lacks the role)
//   stranger-service / stranger-secret roles [S2SAppRole] (not on the test's allowlist)
// Resource servers (any client may ask for any of them), scope `orders.read orders.write`:
//   api://s2s-authz-test    the sidecar's audience
//   api://another-service   someone else's

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import Provider, { errors } from 'oidc-provider';

const RESOURCE_SERVERS = ['api://s2s-authz-test', 'api://another-service'];
const SCOPE = 'orders.read orders.write';
const CLIENTS = [
  { client_id: 'orders-service', client_secret: 'orders-secret', roles: ['S2SAppRole'] },
  { client_id: 'billing-service', client_secret: 'billing-secret', roles: [] },
  { client_id: 'stranger-service', client_secret: 'stranger-secret', roles: ['S2SAppRole'] },
];

const version = JSON.parse(
  readFileSync(new URL('./node_modules/oidc-provider/package.json', import.meta.url), 'utf8'),
).version;

const portArg = process.argv[2] ?? process.env.OIDC_PROVIDER_PORT ?? '0';
const port = Number.parseInt(portArg, 10);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`bad port \`${portArg}\``);
  process.exit(2);
}

// A fresh RS256 signing key for each run; only its public half is ever published (at /jwks).
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = {
  ...privateKey.export({ format: 'jwk' }),
  kid: `rs256-${Date.now().toString(36)}`,
  alg: 'RS256',
  use: 'sig',
};

function configuration() {
  return {
    jwks: { keys: [signingKey] },
    cookies: { keys: [randomBytes(32).toString('base64url')] },
    clients: CLIENTS.map(({ client_id, client_secret }) => ({
      client_id,
      client_secret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic',
    })),
    features: {
      // No browser flows here: no login pages, no user accounts.
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: false },
      revocation: { enabled: false },
      resourceIndicators: {
        enabled: true,
        // Without a `resource` parameter: the sidecar's API.
        defaultResource: () => RESOURCE_SERVERS[0],
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resourceIndicator) => {
          if (!RESOURCE_SERVERS.includes(resourceIndicator)) {
            throw new errors.InvalidTarget();
          }
          return {
            audience: resourceIndicator,
            scope: SCOPE,
            accessTokenFormat: 'jwt',
            accessTokenTTL: 600,
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    // The app roles a real provider would assign to the client application.
    extraTokenClaims: (ctx, token) => {
      const client = CLIENTS.find((c) => c.client_id === token.clientId);
      return client ? { roles: client.roles } : undefined;
    },
    // Never called: there are no end-user flows. Defined so the provider does not fall back to its
    // development-only default.
    findAccount: () => undefined,
  };
}

const server = createServer();
server.on('error', (err) => {
  console.error(`oidc-provider fixture: ${err.message}`);
  process.exit(1);
});
server.listen(port, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, configuration());
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  server.on('request', provider.callback());
  console.log(`READY ${issuer} oidc-provider/${version}`);
});

// Exit when whoever started us goes away (stdin closes), and on the usual signals.
process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
process.stdin.on('error', () => process.exit(0));
process.stdin.resume();
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => process.exit(0));
}
