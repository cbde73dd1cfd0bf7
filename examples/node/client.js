#!/usr/bin/env node
// Example dworkers client in Node.js: submits one work per argument through
// the public Frontend API and waits for their results on WatchResults.
//
//   node client.js --frontend 127.0.0.1:7000 --kind square 1 2 3
//
// The .proto files are loaded at run time from the repository's protos/
// directory (no generated code). Output: one line per finished work,
// "<work_id> <STATE> <result or error>", in the order they finish.
// Exit status: 0 when every result arrived (DONE or FAILED), 1 on an error
// or a timeout, 2 on a usage error. Errors are one line on stderr.
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");
const { parseArgs } = require("node:util");

const USAGE = `usage: node client.js [--frontend HOST:PORT] [--kind KIND] [--timeout SECONDS]
                      [--max-attempts N] [--protos DIR] [--tls-ca FILE]
                      [--tls-cert FILE --tls-key FILE] [--token-file FILE] PAYLOAD...

Submits one work per PAYLOAD (sent as UTF-8) in a single SubmitWorks call and
prints "<work_id> <STATE> <result or error>" for each as its result arrives.

  --frontend   the Frontend's address (default: $DWORKERS_FRONTEND or 127.0.0.1:7000)
  --kind       the job to run (default: square)
  --timeout    seconds to wait for everything, submission included (default: 30)
  --max-attempts  failed attempts after which a work ends FAILED (default: the server's, 3)
  --protos     the directory holding dworkers/v1/*.proto (default: ../../protos next to this file)
  --tls-ca     TLS to the frontend, trusting this CA (PEM; default $DWORKERS_TLS_CA)
  --tls-cert, --tls-key  a client certificate, for a frontend that asks for one
               (default $DWORKERS_TLS_CERT, $DWORKERS_TLS_KEY)
  --tls-server-name  the name in the frontend's certificate, if not its host
  --token-file a file holding a bearer token, for a frontend that checks access
               (default: the token in $DWORKERS_TOKEN)`;

// Codes worth sending the same request again for: the work ids are fixed
// before the first try, so a resend is answered duplicate=true, never twice.
const RETRYABLE = new Set(["UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"]);
const CALL_TIMEOUT_MS = 10_000; // one unary call; the frontend itself waits up to 10 s for a master
const MAX_TRIES = 5;

class UsageError extends Error {}
class ClientError extends Error {}

function oneLine(text) {
  return String(text).replace(/\s*[\r\n]+\s*/g, " ").trim();
}

function fail(message, code = 1) {
  process.stderr.write(`error: ${oneLine(message)}\n`);
  process.exitCode = code;
  // Let stdout/stderr drain, but never hang on a lingering channel.
  setTimeout(() => process.exit(code), 1000).unref();
}

function parseOptions(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        frontend: { type: "string", default: process.env.DWORKERS_FRONTEND || "127.0.0.1:7000" },
        kind: { type: "string", default: "square" },
        timeout: { type: "string", default: "30" },
        "max-attempts": { type: "string", default: "0" },
        protos: { type: "string", default: path.resolve(__dirname, "..", "..", "protos") },
        "tls-ca": { type: "string", default: process.env.DWORKERS_TLS_CA || "" },
        "tls-cert": { type: "string", default: process.env.DWORKERS_TLS_CERT || "" },
        "tls-key": { type: "string", default: process.env.DWORKERS_TLS_KEY || "" },
        "tls-server-name": { type: "string", default: process.env.DWORKERS_TLS_SERVER_NAME || "" },
        "token-file": { type: "string", default: "" },
        help: { type: "boolean", short: "h", default: false },
      },
    });
  } catch (err) {
    throw new UsageError(err.message);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    process.stdout.write(USAGE + "\n");
    process.exit(0);
  }
  const timeout = Number(values.timeout);
  if (!Number.isFinite(timeout) || timeout <= 0) {
    throw new UsageError(`--timeout must be a positive number of seconds, not ${JSON.stringify(values.timeout)}`);
  }
  const maxAttempts = Number(values["max-attempts"]);
  if (!Number.isInteger(maxAttempts) || maxAttempts < 0) {
    throw new UsageError(`--max-attempts must be a whole number, not ${JSON.stringify(values["max-attempts"])}`);
  }
  if (positionals.length === 0) {
    throw new UsageError("no payloads: give one argument per work, e.g. `--kind square 1 2 3`");
  }
  if (Boolean(values["tls-cert"]) !== Boolean(values["tls-key"])) {
    throw new UsageError("--tls-cert and --tls-key go together");
  }
  return {
    frontend: values.frontend,
    kind: values.kind,
    timeoutMs: timeout * 1000,
    maxAttempts,
    protos: values.protos,
    payloads: positionals,
    tls: { ca: values["tls-ca"], cert: values["tls-cert"], key: values["tls-key"],
      serverName: values["tls-server-name"] },
    tokenFile: values["token-file"],
  };
}

function readFile(file, what) {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new ClientError(`cannot read ${what} ${file}: ${err.code || err.message}`);
  }
}

// TLS when a CA or a client certificate is given; the bearer token (if any)
// travels as metadata on every call, which works over TLS and plaintext alike.
function connection(grpc, options) {
  const { ca, cert, key, serverName } = options.tls;
  const credentials = ca || cert
    ? grpc.credentials.createSsl(ca ? readFile(ca, "--tls-ca") : null, key ? readFile(key, "--tls-key") : null,
      cert ? readFile(cert, "--tls-cert") : null)
    : grpc.credentials.createInsecure();
  const channelOptions = serverName ? { "grpc.ssl_target_name_override": serverName } : {};
  const token = options.tokenFile ? readFile(options.tokenFile, "--token-file").toString("utf8").trim()
    : (process.env.DWORKERS_TOKEN || "");
  const metadata = new grpc.Metadata();
  if (token) metadata.set("authorization", `Bearer ${token}`);
  return { credentials, channelOptions, metadata };
}

function loadFrontend(grpc, protoLoader, protosDir) {
  const file = path.join(protosDir, "dworkers", "v1", "frontend.proto");
  if (!fs.existsSync(file)) {
    throw new ClientError(`cannot find ${file}; point --protos at the repository's protos/ directory`);
  }
  const definition = protoLoader.loadSync("dworkers/v1/frontend.proto", {
    includeDirs: [protosDir],
    keepCase: true, // field names exactly as in the .proto (work_id, after_sequence, ...)
    longs: String, // uint64 sequence numbers as decimal strings: no precision loss
    enums: String, // State as its name: "DONE", "FAILED"
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).dworkers.v1.Frontend;
}

function codeName(grpc, err) {
  return grpc.status[err.code] || String(err.code);
}

function describe(grpc, method, err) {
  const code = codeName(grpc, err);
  const details = oneLine(err.details || err.message || "").replace(/\s*Resolution note:\s*$/, "");
  return `${method} failed (${code}): ${details}`;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function backoff(attempt) {
  const base = Math.min(200 * 2 ** attempt, 2000);
  return base / 2 + Math.random() * (base / 2);
}

// One unary call, retried with backoff on transient errors. The request
// object is the same on every try (same work ids), so retries are idempotent.
async function callWithRetry(grpc, client, method, request, deadlineAt) {
  let lastError;
  for (let attempt = 0; attempt < MAX_TRIES; attempt++) {
    const remaining = deadlineAt - Date.now();
    if (remaining <= 0) break;
    try {
      return await new Promise((resolve, reject) => {
        client[method](request, client.metadata, { deadline: Date.now() + Math.min(CALL_TIMEOUT_MS, remaining) },
          (err, response) => (err ? reject(err) : resolve(response)));
      });
    } catch (err) {
      lastError = err;
      if (!RETRYABLE.has(codeName(grpc, err)) || attempt === MAX_TRIES - 1) break;
      await sleep(Math.min(backoff(attempt), Math.max(0, deadlineAt - Date.now())));
    }
  }
  if (!lastError) throw new ClientError(`${method} not attempted: the --timeout ran out first`);
  let message = describe(grpc, method, lastError);
  if (codeName(grpc, lastError) === "UNAVAILABLE") message = `cannot reach the cluster through ${client.address}: ${message}`;
  throw new ClientError(message);
}

function formatResult(r) {
  let text;
  if (r.state === "DONE") {
    // content_type says how the job's result was encoded: JSON, text, or bytes ("").
    const buf = Buffer.from(r.result || []);
    const utf8 = buf.toString("utf8");
    if (r.content_type === "application/json") {
      text = JSON.stringify(JSON.parse(utf8));
    } else {
      text = Buffer.from(utf8, "utf8").equals(buf) ? utf8 : `base64:${buf.toString("base64")}`;
    }
  } else {
    text = r.error || "";
  }
  return `${r.work_id} ${r.state} ${text.replace(/\r/g, "\\r").replace(/\n/g, "\\n")}`;
}

// Follows WatchResults from `afterSequence` until every id in `pending` has a
// result, reconnecting from the last sequence seen when the stream breaks.
function watchUntilDone(grpc, client, afterSequence, pending, deadlineAt, timeoutSeconds) {
  return new Promise((resolve, reject) => {
    let cursor = BigInt(afterSequence || 0);
    let call = null;
    let settled = false;
    let attempt = 0;
    let printed = 0;

    const finish = (err) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (call) call.cancel();
      err ? reject(err) : resolve();
    };
    const timer = setTimeout(() => {
      const missing = [...pending];
      const shown = missing.slice(0, 5).join(", ") + (missing.length > 5 ? ", ..." : "");
      finish(new ClientError(`timed out after ${timeoutSeconds} s: ${missing.length} of ` +
        `${missing.length + printed} results still missing (${shown})`));
    }, Math.max(0, deadlineAt - Date.now()));

    const open = () => {
      if (settled) return;
      const stream = client.WatchResults({ after_sequence: cursor.toString() }, client.metadata);
      call = stream;
      stream.on("data", (batch) => {
        attempt = 0;
        for (const r of batch.results) {
          const seq = BigInt(r.sequence);
          if (seq > cursor) cursor = seq;
          if (!pending.has(r.work_id)) continue; // someone else's work
          pending.delete(r.work_id);
          printed++;
          process.stdout.write(formatResult(r) + "\n");
        }
        if (pending.size === 0) finish();
      });
      const reopen = (reason) => {
        if (settled || stream !== call) return;
        call = null;
        if (attempt === 0) {
          process.stderr.write(`warning: result stream broke (${reason}); resuming after sequence ${cursor}\n`);
        }
        const delay = backoff(attempt++);
        setTimeout(open, delay);
      };
      stream.on("error", (err) => {
        if (settled) return;
        const code = codeName(grpc, err);
        if (code === "CANCELLED" && stream !== call) return;
        if (RETRYABLE.has(code) || code === "UNKNOWN" || code === "INTERNAL") {
          reopen(describe(grpc, "WatchResults", err));
        } else {
          finish(new ClientError(describe(grpc, "WatchResults", err)));
        }
      });
      stream.on("end", () => reopen("closed by the server"));
    };
    open();
  });
}

async function main() {
  let options;
  try {
    options = parseOptions(process.argv.slice(2));
  } catch (err) {
    if (err instanceof UsageError) {
      fail(`${err.message} (see --help)`, 2);
      return;
    }
    throw err;
  }
  const grpc = require("@grpc/grpc-js");
  const protoLoader = require("@grpc/proto-loader");
  const Frontend = loadFrontend(grpc, protoLoader, options.protos);
  const { credentials, channelOptions, metadata } = connection(grpc, options);
  const client = new Frontend(options.frontend, credentials, channelOptions);
  client.address = options.frontend;
  client.metadata = metadata;
  const deadlineAt = Date.now() + options.timeoutMs;

  try {
    // 1. Where the result stream is now: every result of the works submitted
    //    below has a larger sequence number, so watching from here misses none.
    const info = await callWithRetry(grpc, client, "ClusterInfo", {}, deadlineAt);

    // 2. Ids chosen here, before any try: a resend after a lost reply is
    //    recognised by the cluster (duplicate=true) instead of run twice.
    const works = options.payloads.map((payload) => ({
      work_id: crypto.randomUUID(),
      kind: options.kind,
      payload: Buffer.from(payload, "utf8"),
      max_attempts: options.maxAttempts,
    }));
    const reply = await callWithRetry(grpc, client, "SubmitWorks", { works }, deadlineAt);
    const duplicates = reply.works.filter((w) => w.duplicate).length;
    if (duplicates) process.stderr.write(`note: ${duplicates} work(s) were already accepted by an earlier try\n`);

    // 3. Every result after that point, until each of ours has come.
    await watchUntilDone(grpc, client, info.last_sequence, new Set(works.map((w) => w.work_id)),
      deadlineAt, options.timeoutMs / 1000);
  } finally {
    client.close();
  }
}

process.on("uncaughtException", (err) => fail(err && err.message ? err.message : err));
process.on("unhandledRejection", (err) => fail(err && err.message ? err.message : err));

main().then(
  () => {
    if (process.exitCode === undefined) process.exitCode = 0;
  },
  (err) => fail(err instanceof Error ? err.message : err),
);
