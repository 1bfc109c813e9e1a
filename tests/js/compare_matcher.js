#!/usr/bin/env node
'use strict'

// The reference for tests/test_matcher.py: the real complex-matcher package, driven over a pipe.
//
// Reads JSON lines {"expression": "...", "objects": [...]} on stdin ("objects" may be left out to reuse the
// previous line's) and writes one JSON line per input line, in order:
//   {"string": parse(expression).toString(), "matches": [indexes of the matching objects]}
//   {"string": ..., "matchError": "<message>"}  when match() throws
//   {"error": "<message>"}                       when parse() throws, with the message XO would return
//
// xo-server 5.207.2 runs complex-matcher 1.1.1, whose only change to matching since 0.7.0 (the newest on
// npm) is that Comparison no longer requires a number: it applies JavaScript's relational operator to the
// value as is, with its implicit conversions. When an older package is installed, that one change is made
// here so that the reference behaves like the server.

const readline = require('readline')
const CM = require('complex-matcher')
const { version } = require('complex-matcher/package.json')

if (Number(version.split('.')[0]) < 1) {
  CM.Comparison.prototype.match = function (value) {
    return this._comparator(value, this._value)
  }
}

let objects = []

function answer(request) {
  if (request.objects !== undefined) {
    objects = request.objects
  }
  let node
  try {
    node = CM.parse(request.expression)
  } catch (error) {
    return { error: error.message }
  }
  const reply = { string: node.toString() }
  try {
    reply.matches = objects.flatMap((object, index) => (node.match(object) ? [index] : []))
  } catch (error) {
    reply.matchError = error.message
  }
  return reply
}

readline.createInterface({ input: process.stdin, crlfDelay: Infinity }).on('line', line => {
  process.stdout.write(JSON.stringify(answer(JSON.parse(line))) + '\n')
})
