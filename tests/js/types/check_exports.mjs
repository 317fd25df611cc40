// Run by tests/test_js_package.py from a project where `gateway-client` was
// installed (cwd): prints, as JSON, the package's runtime exports and the value
// exports its type declarations give, both resolved the way a consumer's are
// (node's ESM resolution; TypeScript's for `nodenext` and `bundler`).
//
//   node check_exports.mjs /path/to/node_modules/typescript
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(import.meta.url);
const ts = require(process.argv[2]);

function runtimeKind(value) {
  if (typeof value !== 'function') return typeof value;
  return /^class\b/.test(Function.prototype.toString.call(value)) ? 'class' : 'function';
}

const runtime = await import('gateway-client');
const runtimeExports = Object.fromEntries(
  Object.keys(runtime)
    .sort()
    .map((name) => [name, runtimeKind(runtime[name])]),
);

const base = {
  strict: true,
  noEmit: true,
  target: ts.ScriptTarget.ES2022,
  lib: ['lib.es2022.d.ts', 'lib.dom.d.ts'],
  types: [],
};
const modes = {
  nodenext: { module: ts.ModuleKind.NodeNext, moduleResolution: ts.ModuleResolutionKind.NodeNext },
  bundler: { module: ts.ModuleKind.ESNext, moduleResolution: ts.ModuleResolutionKind.Bundler },
};
// The importing file need not exist: resolution starts from its folder.
const importer = path.join(process.cwd(), 'src', 'app.ts');
const resolved = {};
for (const [mode, options] of Object.entries(modes)) {
  const found = ts.resolveModuleName('gateway-client', importer, { ...base, ...options }, ts.sys);
  resolved[mode] = found.resolvedModule ? found.resolvedModule.resolvedFileName : null;
}

const declared = {};
const diagnostics = [];
if (resolved.nodenext) {
  const options = { ...base, ...modes.nodenext };
  const program = ts.createProgram([resolved.nodenext], options);
  for (const d of ts.getPreEmitDiagnostics(program)) {
    diagnostics.push(ts.flattenDiagnosticMessageText(d.messageText, '\n'));
  }
  const checker = program.getTypeChecker();
  const moduleSymbol = checker.getSymbolAtLocation(program.getSourceFile(resolved.nodenext));
  for (const symbol of moduleSymbol ? checker.getExportsOfModule(moduleSymbol) : []) {
    const flags = symbol.flags;
    if (!(flags & ts.SymbolFlags.Value)) continue; // types and interfaces have no runtime twin
    let kind = 'variable';
    if (flags & ts.SymbolFlags.Class) kind = 'class';
    else if (flags & ts.SymbolFlags.Function) kind = 'function';
    declared[symbol.name] = kind;
  }
}

console.log(JSON.stringify({ runtime: runtimeExports, declared, resolved, diagnostics }));
