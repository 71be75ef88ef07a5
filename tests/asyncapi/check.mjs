// Checks AsyncAPI documents (YAML or JSON; files, or stdin for "-" or no argument) with the
// official parser and its Avro schema parser, then compiles every Avro payload with avsc, which
// the v3 ruleset does not do. Prints one JSON line per document, in the order given:
//   {"file", "diagnostics": [{code, severity, message, path}], "avro": [{path, name, error}], "errors": N}
// severity: 0 error, 1 warning, 2 information, 3 hint. Exit status 1 when any document has
// N > 0 (a diagnostic of severity 0, or an Avro payload avsc refuses), 2 when one cannot be read.
import { readFileSync } from 'node:fs';

import { AvroSchemaParser } from '@asyncapi/avro-schema-parser';
import { Parser } from '@asyncapi/parser';
import avro from 'avsc';
import yaml from 'js-yaml';

const ERROR = 0;
const AVRO_FORMAT = /^application\/vnd\.apache\.avro(\+json|\+yaml)?;version=/;

function avroPayloads(node, path, found) {
  if (Array.isArray(node)) {
    node.forEach((item, index) => avroPayloads(item, [...path, String(index)], found));
  } else if (node !== null && typeof node === 'object') {
    if (typeof node.schemaFormat === 'string' && AVRO_FORMAT.test(node.schemaFormat) && 'schema' in node) {
      found.push({ path: [...path, 'schema'], schema: node.schema });
    }
    for (const [key, value] of Object.entries(node)) avroPayloads(value, [...path, key], found);
  }
  return found;
}

async function check(file) {
  const source = readFileSync(file === '-' ? 0 : file, 'utf8');
  const parser = new Parser();
  parser.registerSchemaParser(AvroSchemaParser());
  const { diagnostics } = await parser.parse(source);
  const report = {
    file,
    diagnostics: diagnostics.map((d) => ({
      code: String(d.code), severity: d.severity, message: d.message, path: d.path.map(String),
    })),
    avro: [],
  };
  let parsed = null;
  try {
    parsed = yaml.load(source); // JSON is YAML
  } catch {
    // The parser has reported it.
  }
  for (const { path, schema } of avroPayloads(parsed, [], [])) {
    let name = null;
    let error = null;
    try {
      name = avro.Type.forSchema(schema).name ?? null;
    } catch (exc) {
      error = exc.message;
    }
    report.avro.push({ path, name, error });
  }
  report.errors = report.diagnostics.filter((d) => d.severity === ERROR).length
    + report.avro.filter((a) => a.error !== null).length;
  return report;
}

const files = process.argv.length > 2 ? process.argv.slice(2) : ['-'];
let failed = false;
for (const file of files) {
  let report;
  try {
    report = await check(file);
  } catch (error) {
    console.log(JSON.stringify({ file, fatal: `cannot check the document: ${error.message}` }));
    process.exit(2);
  }
  failed ||= report.errors > 0;
  console.log(JSON.stringify(report));
}
process.exit(failed ? 1 : 0);
