// Report usage to meterd and read a balance, from Node.js.
//
//   npm ci && node client.js [target] [customer]
//
// Loads the protocol from ../../proto at run time with @grpc/proto-loader. The
// batch carries a client id and a sequence number: resending the same batch
// (after a timeout, say) is answered as a duplicate and not counted twice.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.join(__dirname, "..", "..", "proto");

function loadMeter() {
  const definition = protoLoader.loadSync(path.join(PROTO, "meterd", "v1", "meter.proto"), {
    includeDirs: [PROTO],
    keepCase: true,
    longs: String, // int64 nano amounts do not fit a JS number: keep them as strings
    enums: String,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).meterd.v1;
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 10000 }, (err, response) =>
      err ? reject(err) : resolve(response));
  });
}

async function main(target = "127.0.0.1:50051", customer = "demo") {
  const meterd = loadMeter();
  const client = new meterd.Meter(target, grpc.credentials.createInsecure());
  const event = { customer_id: customer, meter: "input_tokens", quantity: "1200", dimensions: { model: "gpt-4o" } };

  const one = await call(client, "Report", { event });
  console.log(`Report ${one.decision} cost_nano=${one.cost_nano} balance_nano=${one.balance_nano}`);

  const batch = { client_id: `node-${process.pid}`, sequence: "1", events: [event, event, event] };
  const first = await call(client, "ReportBatch", batch);
  const again = await call(client, "ReportBatch", batch); // a retry of the same batch
  console.log(`ReportBatch accepted=${first.accepted} duplicate=${first.duplicate}; ` +
              `resent: accepted=${again.accepted} duplicate=${again.duplicate}`);

  const balance = await call(client, "GetBalance", { customer_id: customer });
  for (const b of balance.balances) {
    console.log(`balance ${b.credit_type} ${b.balance_nano}`);
  }
  for (const u of balance.usage) {
    console.log(`usage ${u.meter} ${u.quantity}`);
  }
  client.close();
}

main(...process.argv.slice(2)).catch((err) => {
  console.error(`meterd call failed: ${err.code} ${err.details || err.message}`);
  process.exit(1);
});
