// A real OpenID Connect provider for the sign-in tests: oidc-provider (the version pinned in package.json)
// on 127.0.0.1, with a fixed list of people and clients read from a JSON file.
//
//   node tests/oidc/provider.mjs config.json
//
// config.json:
//   {
//     "port": 9000,                                  // required; 0 is not allowed (the issuer names the port)
//     "issuer": "http://127.0.0.1:9000",             // optional, that by default
//     "users": [{"email": "alice@example.com", "password": "alice-password", "name": "Alice"}, ...],
//     "clients": [{"client_id": "cifar10", "client_secret": "...",
//                  "redirect_uris": ["http://127.0.0.1:8501/oauth2callback"],
//                  "post_logout_redirect_uris": [...]}],   // optional, the redirect_uris by default
//     "any_loopback_port": false,  // true: a redirect URI on 127.0.0.1/localhost/[::1] matches a
//                                  // registered one whatever its port (RFC 8252 7.3, for every client)
//     "auto_logout": true          // true: the provider's "sign out?" page submits itself (yes)
//   }
//
// It prints one line "ready <issuer>" on stdout once it listens. The sign-in page is a form with
// `email` and `password` fields and a "Sign in" button; a wrong password shows the form again with an error.
//
// Two settings that Streamlit's st.login needs and oidc-provider does not do by default:
// - st.login asks for `prompt=select_account`; oidc-provider accepts only the prompts its interaction
//   policy names (`none`, `login`, `consent`), so a requestable `select_account` prompt is added: it shows
//   the sign-in page, where the person picks the account.
// - st.user is read from the ID token; oidc-provider puts scope claims (email, name) only in the UserInfo
//   response unless `conformIdTokenClaims` is false.
// Consent is implied (a first-party app): every grant holds `openid email profile`.

import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';

import Provider, { interactionPolicy } from 'oidc-provider';

const configPath = process.argv[2];
if (!configPath) {
  console.error('usage: node provider.mjs config.json');
  process.exit(2);
}
const config = JSON.parse(fs.readFileSync(configPath, 'utf8'));
const port = Number(config.port);
if (!Number.isInteger(port) || port <= 0) {
  console.error('config.port must be a port number');
  process.exit(2);
}
const issuer = config.issuer || `http://127.0.0.1:${port}`;
const SCOPE = 'openid email profile';

const users = (config.users || []).map((user) => ({
  sub: user.sub || user.email,
  email: user.email,
  password: user.password,
  name: user.name || user.email.split('@')[0],
}));
const bySub = new Map(users.map((user) => [user.sub, user]));
const byEmail = new Map(users.map((user) => [user.email.toLowerCase(), user]));

const clients = (config.clients || []).map((client) => ({
  client_id: client.client_id,
  client_secret: client.client_secret,
  redirect_uris: client.redirect_uris,
  post_logout_redirect_uris: client.post_logout_redirect_uris || client.redirect_uris,
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
  token_endpoint_auth_method: client.token_endpoint_auth_method || 'client_secret_basic',
}));

const escape = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

const policy = interactionPolicy.base();
// Requestable: `prompt=select_account` is accepted, and when asked for, the sign-in page is shown (to pick
// the account) even to a browser that is signed in at the provider already.
policy.add(new interactionPolicy.Prompt({ name: 'select_account', requestable: true }));

const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'test-key', use: 'sig', alg: 'RS256' };

const provider = new Provider(issuer, {
  clients,
  jwks: { keys: [signingKey] },
  cookies: {
    keys: [crypto.randomBytes(32).toString('hex')],
    // SameSite=None cookies (the default for the long-lived session cookie) are dropped by browsers
    // on plain http, so all cookies are Lax here.
    long: { httpOnly: true, sameSite: 'lax', signed: true },
    short: { httpOnly: true, sameSite: 'lax', signed: true },
  },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
  },
  conformIdTokenClaims: false,
  async findAccount(ctx, sub) {
    const user = bySub.get(sub);
    if (!user) return undefined;
    return {
      accountId: sub,
      async claims() {
        return {
          sub, email: user.email, email_verified: true, name: user.name, preferred_username: user.email,
        };
      },
    };
  },
  interactions: {
    policy,
    url: (ctx, interaction) => `/interaction/${interaction.uid}`,
  },
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) {
      const grant = await ctx.oidc.provider.Grant.find(grantId);
      if (grant && grant.accountId === ctx.oidc.account.accountId) return grant;
    }
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.account.accountId,
    });
    grant.addOIDCScope(SCOPE);
    await grant.save();
    return grant;
  },
  features: {
    devInteractions: { enabled: false },
    rpInitiatedLogout: {
      enabled: true,
      async logoutSource(ctx, form) {
        const auto = config.auto_logout === false ? '' : `<script>
          const f = document.getElementById('op.logoutForm');
          const yes = document.createElement('input');
          yes.type = 'hidden'; yes.name = 'logout'; yes.value = 'yes';
          f.appendChild(yes); f.submit();
        </script>`;
        ctx.body = `<!DOCTYPE html><html><head><meta charset="utf-8"><title>Sign out</title></head><body>
          <h1>Sign out of the test provider?</h1>${form}
          <button type="submit" form="op.logoutForm" name="logout" value="yes">Yes, sign me out</button>
          <button type="submit" form="op.logoutForm">No, stay signed in</button>${auto}</body></html>`;
      },
    },
  },
  ttl: {
    AccessToken: 3600, AuthorizationCode: 600, IdToken: 3600, Interaction: 3600, Session: 86400,
    Grant: 86400, RefreshToken: 86400,
  },
  async renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = `<!DOCTYPE html><html><head><meta charset="utf-8"><title>Sign-in error</title></head><body>
      <h1>Sign-in error</h1>${Object.entries(out).map(([k, v]) => `<p><b>${escape(k)}</b>: ${escape(v)}</p>`).join('')}
      </body></html>`;
  },
});

if (config.any_loopback_port) {
  const LOOPBACKS = new Set(['127.0.0.1', 'localhost', '[::1]']);
  const portless = (value) => {
    try {
      const url = new URL(value);
      if (url.protocol === 'http:' && LOOPBACKS.has(url.hostname)) url.port = '';
      return url.href;
    } catch {
      return undefined;
    }
  };
  const { redirectUriAllowed, postLogoutRedirectUriAllowed } = provider.Client.prototype;
  provider.Client.prototype.redirectUriAllowed = function allowed(value) {
    return redirectUriAllowed.call(this, value)
      || this.redirectUris.some((uri) => portless(uri) !== undefined && portless(uri) === portless(value));
  };
  provider.Client.prototype.postLogoutRedirectUriAllowed = function allowed(value) {
    return postLogoutRedirectUriAllowed.call(this, value)
      || this.postLogoutRedirectUris.some((uri) => portless(uri) !== undefined && portless(uri) === portless(value));
  };
}

function signInPage(uid, clientId, error = '', email = '') {
  return `<!DOCTYPE html><html><head><meta charset="utf-8"><title>Sign in</title>
    <style>body{font-family:sans-serif;max-width:26em;margin:3em auto}label,input,button{display:block;width:100%;
    margin:.4em 0}input,button{padding:.5em;font-size:1em}.error{color:#b00}</style></head><body>
    <h1>Sign in</h1><p>to <b>${escape(clientId)}</b> (test provider)</p>
    ${error ? `<p class="error" role="alert">${escape(error)}</p>` : ''}
    <form method="post" action="/interaction/${escape(uid)}/login" autocomplete="off">
      <label for="email">E-mail</label><input id="email" name="email" type="email" value="${escape(email)}" required autofocus>
      <label for="password">Password</label><input id="password" name="password" type="password" required>
      <button type="submit">Sign in</button>
    </form>
    <form method="post" action="/interaction/${escape(uid)}/abort"><button type="submit">Cancel</button></form>
    </body></html>`;
}

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 65536) throw new Error('form too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function send(res, status, html) {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(html);
}

async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) {
    send(res, 400, '<h1>Sign-in error</h1><p>This sign-in page has expired; start again.</p>');
    return;
  }
  const clientId = details.params.client_id;
  if (details.prompt.name === 'consent') {
    // First-party app: consent is given without asking (loadExistingGrant usually makes this unreachable).
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: details.session.accountId, clientId });
    grant.addOIDCScope(SCOPE);
    const { missingOIDCScope, missingOIDCClaims } = details.prompt.details;
    if (missingOIDCScope) grant.addOIDCScope(missingOIDCScope.join(' '));
    if (missingOIDCClaims) grant.addOIDCClaims(missingOIDCClaims);
    const grantId = await grant.save();
    await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
    return;
  }
  if (req.method === 'GET' && !action) {
    send(res, 200, signInPage(uid, clientId));
    return;
  }
  if (req.method === 'POST' && action === 'abort') {
    await provider.interactionFinished(req, res, {
      error: 'access_denied', error_description: 'The person cancelled the sign-in',
    }, { mergeWithLastSubmission: false });
    return;
  }
  if (req.method === 'POST' && action === 'login') {
    const form = await readForm(req);
    const email = (form.get('email') || '').trim();
    const user = byEmail.get(email.toLowerCase());
    const given = Buffer.from(form.get('password') || '');
    const expected = Buffer.from(user ? user.password : '');
    if (!user || given.length !== expected.length || !crypto.timingSafeEqual(given, expected)) {
      send(res, 200, signInPage(uid, clientId, 'Wrong e-mail or password.', email));
      return;
    }
    console.log(`signed in ${user.email} for ${clientId}`);
    await provider.interactionFinished(req, res, {
      login: { accountId: user.sub },
      select_account: {},
    }, { mergeWithLastSubmission: false });
    return;
  }
  send(res, 405, '<h1>Method not allowed</h1>');
}

const handle = provider.callback();
const server = http.createServer(async (req, res) => {
  const match = /^\/interaction\/([^/?#]+)(?:\/(login|abort))?\/?(?:\?.*)?$/.exec(req.url);
  if (!match) {
    handle(req, res);
    return;
  }
  try {
    await interaction(req, res, match[1], match[2]);
  } catch (error) {
    console.error(`interaction error: ${error.stack || error}`);
    if (!res.headersSent) send(res, 400, `<h1>Sign-in error</h1><p>${escape(error.message || error)}</p>`);
    else res.end();
  }
});

provider.on('server_error', (ctx, error) => console.error(`server_error: ${error.stack || error}`));
provider.on('authorization.error', (ctx, error) => console.error(`authorization.error: ${error.message} ${error.error_description || ''}`));
provider.on('grant.error', (ctx, error) => console.error(`grant.error: ${error.message} ${error.error_description || ''}`));
provider.on('end_session.error', (ctx, error) => console.error(`end_session.error: ${error.message} ${error.error_description || ''}`));

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}

server.listen(port, config.host || '127.0.0.1', () => {
  console.log(`ready ${issuer}`);
});
