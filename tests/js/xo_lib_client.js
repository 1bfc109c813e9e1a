// Drives the xofs simulator with XO's own client library, xo-lib 0.9.0 (as xo-cli and xo-web do).
//
// Usage: node xo_lib_client.js <http url> <token>
// Prints one JSON line {"event": "ready", ...} once signed in with the objects it got, then waits for the
// first `all` notification that carries a VM and prints {"event": "notification", ...}, then exits 0.
// Any failure prints {"event": "error", ...} and exits 1.
'use strict'

const Xo = require('xo-lib').default

const print = value => process.stdout.write(JSON.stringify(value) + '\n')

async function main () {
  const [url, token] = process.argv.slice(2)
  const xo = new Xo({ url })
  const notifications = []
  xo.on('notification', message => notifications.push(message))

  await xo.open()
  await xo.signIn({ token })
  const objects = await xo.call('xo.getAllObjects', { filter: { type: 'VM' } })
  const version = await xo.call('system.getServerVersion')
  print({
    event: 'ready',
    user: xo.user,
    version,
    vms: Object.values(objects).map(vm => ({ id: vm.id, name_label: vm.name_label, power_state: vm.power_state })),
    notificationsBeforeChange: notifications.length,
  })

  const message = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no notification within 20 s')), 20e3)
    const check = () => {
      const found = notifications.find(n =>
        n.method === 'all' && Object.values(n.params.items).some(item => item && item.type === 'VM'))
      if (found !== undefined) {
        clearTimeout(timer)
        resolve(found)
      }
    }
    xo.on('notification', check)
    check()
  })
  print({ event: 'notification', method: message.method, params: message.params })
  await xo.close()
}

main().then(
  () => process.exit(0),
  error => {
    print({ event: 'error', message: String(error && error.message), code: error && error.code })
    process.exit(1)
  }
)
