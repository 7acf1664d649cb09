---@meta pve
-- LuaLS (lua-language-server) definitions for mtunnel handler files: the global `pve`, the
-- `ctx` table a handler's `run` receives, and the shape of a handler table with its
-- parameter schema. This file is never run: mtunnel skips it when it scans a handlers
-- directory, because `pve.d` is not a command name (command names use only a-z, 0-9, '-').
--
-- Use: keep this file next to your handler files (your editor then finds it in the
-- workspace), or point `workspace.library` at it. A `.luarc.json` that matches the sandbox:
--
--   {
--     "runtime": {
--       "version": "Lua 5.4",
--       "builtin": { "io": "disable", "os": "disable", "package": "disable",
--                    "debug": "disable", "coroutine": "disable" }
--     },
--     "workspace": { "library": ["/path/to/pve.d.lua"] }
--   }
--
-- The editor still offers `load`, `dofile`, `require`, `collectgarbage`, `rawset` and
-- `string.dump` (part of LuaLS's "basic"/"string" libraries); they are nil in the sandbox.
--
-- Annotate a handler like this to get completion and type checks for `ctx` and the table:
--
--   ---@type mtunnel.Handler
--   local handler = {
--     description = "...",
--     params = { storage = { type = "string", format = "pve-storage-id" } },
--     run = function(ctx, p) ... end,
--   }
--   return handler
--
-- Functions marked `---@async` may wait (storage, QEMU, cleanup). Call them from handler
-- code or inside `pcall`/`xpcall`, never in a callback of a C function (`table.sort`,
-- `string.gsub`): a wait there fails with "attempt to yield across a C-call boundary".
--
-- Not in the sandbox (nil at run time): `io`, `os`, `debug`, `package`, `coroutine`,
-- `require`, `load`, `loadfile`, `dofile`, `collectgarbage`, `rawset`, `string.dump`.
--
-- Reference: handlers/README.md and docs/handlers/*.md.

------------------------------------------------------------------------------------------
-- Values shared by several functions
------------------------------------------------------------------------------------------

---The JSON `null` sentinel (`pve.json.null`). It is a light userdata and therefore TRUE in
---a condition: compare with `== pve.json.null`, not with `nil`.
---@alias pve.json.Null lightuserdata

---A VM config as `ctx.conf`, `pve.config.load` and `pve.config.parse` return it. Every
---option value is a string, exactly as in the file.
---@class pve.VmConfig
---@field description string|pve.json.Null The decoded `#` comment block of the main section; null when there is none.
---@field options table<string, string> Main-section options (`memory`, `scsi0`, `lock`, ...).
---@field pending table<string, string> The `[PENDING]` section (may hold `delete` and `description`).
---@field special table<string, table<string, string>> `[special:cloudinit]` / `[special:fleecing]` sections by name.
---@field snapshots table<string, pve.Snapshot> Snapshot sections by name (read only: `pve.config.write` does not write them).
---@field digest string SHA-1 hex of the text the config was parsed from.

---One snapshot section of a VM config.
---@class pve.Snapshot
---@field description string|pve.json.Null
---@field options table<string, string>

---What `pve.config.write` reads. Only these four keys are used; `snapshots`, `digest` and
---anything else are ignored. Numbers become their decimal text, booleans "1"/"0", null
---entries are left out; a nested table is an error.
---@class pve.VmConfigInput
---@field description? string|pve.json.Null Written as `#` comment lines; must not be empty or end in whitespace.
---@field options? table<string, string|number|boolean|pve.json.Null>
---@field pending? table<string, string|number|boolean|pve.json.Null>
---@field special? table<string, table<string, string|number|boolean|pve.json.Null>> Names must be `cloudinit` or `fleecing`.

---@class pve.StorageFormats
---@field default string The format used when the requested one is not valid (`"raw"`).
---@field valid string[] Formats the storage can hold (`{ "raw", "qcow2" }` for a `dir` storage).

---@class pve.ImportStartOptions
---@field storage string Storage id (not permission-checked here: call `pve.storage.check` first).
---@field volname string Preferred name, e.g. `vm-100-disk-0.qcow2`.
---@field format string Target image format (`raw` or `qcow2` on a `dir` storage).
---@field export_formats string Comma list of stream formats the source offers, preferred first.
---@field allow_rename? boolean|integer|string Pick the next free `vm-<vmid>-disk-N` if the name is taken (lenient boolean; default false).

---@class pve.ImportStarted
---@field socket string `{run}/{vmid}.storage`, registered for tickets.
---@field format string The chosen stream format (`raw+size` or `qcow2+size`).

---@class pve.ImportStatus
---@field status "pending"|"complete"|"error"
---@field msg? string `pending`: "received N bytes"; `error`: the reason.
---@field volid? string `complete`: the new volume (now tracked for cleanup).

---@class pve.StartIncomingOptions
---@field machine? string QEMU machine (`forcemachine` of the source).
---@field cpu? string A `-cpu` argument (`forcecpu` of the source).
---@field nbd? table<string, string> Drive key (`scsi0`) -> target volid to export over NBD.
---@field multifd? integer RAM over this many multifd channels (mtunnel's extension; at most `multifd_max()`).

---@class pve.IncomingStarted
---@field migrate_socket string `{run}/{vmid}.migrate`
---@field nbd_socket string|pve.json.Null `{run}/{vmid}_nbd.migrate`, or null when no drive is exported.
---@field nbd_uris table<string, string> Drive key -> `nbd:unix:<socket>:exportname=drive-<key>`.

------------------------------------------------------------------------------------------
-- The handler table, ctx and the parameter schema
------------------------------------------------------------------------------------------

---@alias mtunnel.SchemaType
---| "string"
---| "integer"
---| "number"
---| "boolean"
---| "object"
---| "array"
---| "any"

---@alias mtunnel.SchemaFormat
---| "pve-storage-id"  # [a-z][a-z0-9_.-]*[a-z0-9], at least 2 characters
---| "pve-node"        # node name: letters, digits, '-', not at either end, at most 63
---| "pve-vmid"        # 3 to 9 digits, no leading zero
---| "pve-volume-id"   # <valid storage id>:<non-empty rest>
---| "pve-configid"    # [a-zA-Z][a-zA-Z0-9_-]+, at least 2 characters (as PVE)
---| "safe-path"       # only [A-Za-z0-9._/-]

---A schema. Keys other than these make the handler fail to load ("unknown schema key").
---@class mtunnel.Schema
---@field type mtunnel.SchemaType Required.
---@field description? string Free text (not checked).
---@field enum? string[] string: allowed values.
---@field pattern? string string: regex (regex-lite syntax), anchored to the whole value.
---@field format? mtunnel.SchemaFormat string: a named format.
---@field minLength? integer string: minimum length in bytes.
---@field maxLength? integer string: maximum length in bytes.
---@field minimum? number integer/number: lower bound.
---@field maximum? number integer/number: upper bound.
---@field properties? table<string, mtunnel.Property> object: its properties.
---@field additionalProperties? boolean|integer object: keep unknown keys (default false: reject them).
---@field items? mtunnel.Schema array: schema every element is checked against.
---@field maxItems? integer array: maximum number of elements.
---@field members? any array: accepted for PVE compatibility and IGNORED (elements unchecked).

---A property of `params` or of an object's `properties`.
---@class mtunnel.Property: mtunnel.Schema
---@field optional? boolean|integer May be absent (default false). JSON null counts as absent.
---@field default? string|number|boolean Filled in when absent or null (checked against the schema at load time).

---`params`: property name -> property; `false` for a command that ignores its parameters.
---@alias mtunnel.Params table<string, mtunnel.Property>|false

---The table a handler file returns. Any other key makes the handler fail to load.
---@class mtunnel.Handler
---@field description string One line, shown by `mtunnel handlers check`.
---@field params mtunnel.Params Required.
---@field lock? boolean Run under the VM's config lock with the expected-lock check (default true).
---@field run fun(ctx: mtunnel.Ctx, params: table<string, any>): table|nil Returns the reply fields (nil = none).

---The first argument of `run`. Built fresh for every command; only `state` lives on.
---@class mtunnel.Ctx
---@field vmid integer The target VMID of this tunnel.
---@field cmd string The wire command being handled.
---@field authid string The API token id that opened the tunnel (`user@realm!name`).
---@field node string This node's name.
---@field conf pve.VmConfig|nil The config as read under the lock before `run`; nil when the handler has `lock = false`. A copy: changing it writes nothing.
---@field state table One table for the whole tunnel, shared by all handlers.
---@field exit fun(self: mtunnel.Ctx) Switch the tunnel to exit mode after this reply (`ctx:exit()`).

------------------------------------------------------------------------------------------
-- The global `pve` (read-only: assigning to it or to a sub-table raises
-- "pve is read-only (tried to set '<key>')")
------------------------------------------------------------------------------------------

---The mtunnel host API.
---@class pvelib
pve = {}

---Raise an error whose message reaches the reply verbatim
---(`failed to handle '<cmd>' command - <msg>`), without a file/line prefix. Never returns.
---A non-string `msg` is converted to text.
---@param msg any
function pve.fail(msg) end

---The table the built-in handler file of `cmd` returns, loaded afresh, so an override can
---wrap it (`return base.run(ctx, p)`) instead of copying it. See docs/handlers/builtin.md.
---@param cmd string
---@return {description: string, params: table|false, lock: boolean|nil, run: fun(ctx: table, p: table): table}
function pve.builtin(cmd) end

------------------------------------------------------------------------------------------
---Task-log output. See docs/handlers/log.md.
---@class pve.log
pve.log = {}

---Append a line to the tunnel's task log (and the server log).
---@param msg string
function pve.log.info(msg) end

---Append `WARN: <msg>` to the task log; the task then ends with `TASK WARNINGS: n`.
---@param msg string
function pve.log.warn(msg) end

---Write to the server log at debug level only (not the task log).
---@param msg string
function pve.log.debug(msg) end

------------------------------------------------------------------------------------------
---JSON helpers. See docs/handlers/json.md.
---@class pve.json
pve.json = {}

---The JSON null sentinel: put it in a reply to send `null`; incoming nulls inside `any`
---values, arrays and open objects arrive as this value. Truthy: compare with `==`.
---@type pve.json.Null
pve.json.null = nil

---Mark `t` (or a new empty table) as a JSON array, so `{}` encodes as `[]`. Returns `t`.
---@generic T: table
---@param t? T
---@return T
function pve.json.array(t) end

---Encode a Lua value as compact JSON (object keys sorted).
---@param value any
---@return string
function pve.json.encode(value) end

---Decode JSON text. Raises "json decode: <reason>".
---@param text string
---@return any
function pve.json.decode(text) end

------------------------------------------------------------------------------------------
---VM config files and property strings. See docs/handlers/config.md.
---@class pve.config
pve.config = {}

---Read and parse this VM's config file now (lenient: unknown sections are skipped).
---@return pve.VmConfig
function pve.config.load() end

---Parse config text strictly (an unknown section is an error), as `config` does with what
---the source sends.
---@param text string
---@return pve.VmConfig
function pve.config.parse(text) end

---Validate and write this VM's config file. Needs the config lock (`lock` not false).
---Writes description, options, `[PENDING]` and special sections; NEVER snapshot sections.
---@param conf pve.VmConfigInput|pve.VmConfig
function pve.config.write(conf) end

---The text `pve.config.write(conf)` would write, without writing it; `parse` reads it back.
---@param conf pve.VmConfigInput|pve.VmConfig
---@return string
function pve.config.format(conf) end

---Split a drive value (`scsi0`, `ide2`, ...); the key-less first part becomes `file`, and
---PVE's alias `volume=` comes back as `file`. All values are strings.
---@param value string
---@return table<string, string>
function pve.config.parse_drive(value) end

---Split any property string (`net0`, `agent`, ...); a key-less part belongs to
---`default_key` (an error without one). All values are strings.
---@param value string
---@param default_key? string
---@return table<string, string>
function pve.config.parse_property_string(value, default_key) end

---Print a property string as PVE does: `file` first without a key, then `key=value` sorted.
---Raises for what would not read back the same (a key with `,`/`=`, a value with a comma, ...).
---@param props table<string, string|number|boolean|pve.json.Null>
---@return string
function pve.config.print_drive(props) end

---Bytes of a PVE size (`32G`, `1.5G`, `4096K`, `100`), or nil if it is not one.
---@param s string
---@return integer|nil
function pve.config.parse_size(s) end

---Render bytes as PVE does: the largest of T/G/M/K that divides exactly, else bytes (`0` -> `0T`).
---@param bytes integer
---@return string
function pve.config.format_size(bytes) end

---Whether `key` is a disk option: ide0-3, sata0-5, scsi0-30, virtio0-15, efidisk0,
---tpmstate0, unused0-255.
---@param key string
---@return boolean
function pve.config.is_drive_key(key) end

------------------------------------------------------------------------------------------
---Storages and volumes. See docs/handlers/storage.md.
---@class pve.storage
pve.storage = {}

---Raise unless VM images may be put on `storage`: it exists, is enabled, holds `images`,
---and the token has `Datastore.AllocateSpace` on `/storage/<storage>`.
---@param storage string
function pve.storage.check(storage) end

---Formats a storage can hold. Only checks that the storage exists.
---@param storage string
---@return pve.StorageFormats
function pve.storage.formats(storage) end

---Allocate an empty image and record it for cleanup. No permission check: call
---`pve.storage.check` first. Without `name`: the lowest free `vm-<vmid>-disk-N`.
---@async
---@param storage string
---@param format string `raw` or `qcow2`
---@param size_kib integer Size in KiB (use `//` so it stays an integer).
---@param name? string
---@return string volid e.g. `local:100/vm-100-disk-0.qcow2`
function pve.storage.alloc(storage, format, size_kib, name) end

---Free a volume this tunnel allocated or imported, and stop tracking it.
---@async
---@param volid string
function pve.storage.free(volid) end

---Whether `volid` is tracked by this tunnel (allocated or imported, not freed).
---@param volid string
---@return boolean
function pve.storage.owned(volid) end

---The local file of a volume (need not exist, need not be this tunnel's).
---@param volid string
---@return string
function pve.storage.path(volid) end

---Effective bandwidth limit in KiB/s for `operation` on `storages`, combined with the
---user's override; nil means no limit.
---@param operation string
---@param storages? (string|pve.json.Null)[]
---@param override_kib? integer
---@return integer|nil
function pve.storage.bwlimit(operation, storages, override_kib) end

---Start receiving one `*+size` stream on `{run}/{vmid}.storage` (one import at a time).
---@async
---@param opts pve.ImportStartOptions
---@return pve.ImportStarted
function pve.storage.import_start(opts) end

---State of the running import; `complete`/`error` end it.
---@async
---@return pve.ImportStatus
function pve.storage.import_status() end

------------------------------------------------------------------------------------------
---The VM's QEMU process. See docs/handlers/qemu.md.
---@class pve.qemu
pve.qemu = {}

---Raise with the error `start_incoming` would give if a VM with these config options were
---started (unsupported devices, out-of-range values, malformed property strings). Pure: no
---files, no volumes, no tunnel needed.
---@param options table<string, string|number|boolean|pve.json.Null>
function pve.qemu.check_config(options) end

---Start the VM (from its config file) paused, waiting for an incoming migration, with the
---given drives exported over NBD. Records "VM started" for cleanup before it tries.
---@async
---@param opts pve.StartIncomingOptions
---@return pve.IncomingStarted
function pve.qemu.start_incoming(opts) end

---The node's `multifd_channels_max`: most multifd channels `start_incoming` accepts (1: none).
---@return integer
function pve.qemu.multifd_max() end

---Continue the paused (or wake the suspended) VM.
---@async
function pve.qemu.resume() end

---Hard-stop the VM; not an error if it does not run.
---@async
function pve.qemu.stop() end

---Stop the VM's NBD server.
---@async
function pve.qemu.nbd_stop() end

---Ask the guest agent to trim file systems.
---@async
function pve.qemu.fstrim() end

---Whether the VM's QEMU process runs.
---@async
---@return boolean
function pve.qemu.is_running() end

------------------------------------------------------------------------------------------
---The VM's firewall file `{data}/firewall/<vmid>.fw`. See docs/handlers/firewall.md.
---@class pve.firewall
pve.firewall = {}

---Write the firewall file (content not checked) and record it for cleanup.
---@async
---@param text string
function pve.firewall.write(text) end

---Remove the firewall file if it exists.
---@async
function pve.firewall.remove() end

------------------------------------------------------------------------------------------
---The tunnel itself. See docs/handlers/tunnel.md.
---@class pve.tunnel
pve.tunnel = {}

---A PVETUNNEL ticket for one of this tunnel's registered sockets, for the tunnel's token.
---@param path string
---@return string
function pve.tunnel.ticket(path) end

---The lock every later locked command expects on the config (nil: none). Journaled.
---@async
---@param lock string|nil
function pve.tunnel.expect_lock(lock) end

---Mark the migration as past its point of no return: however the tunnel ends, nothing is
---freed any more. Journaled before the command replies.
---@async
function pve.tunnel.commit() end

---Free now what this tunnel created: abort a running import, stop a VM it started, free
---its volumes, remove a firewall file it wrote, remove the VM config — never a VM past
---resume. Afterwards the tunnel frees nothing again. Never raises.
---@async
function pve.tunnel.cleanup() end

---Whether a bridge is known here: listed in the node config's `bridges`, or
---`/sys/class/net/<name>` exists.
---@param name string
---@return boolean
function pve.tunnel.bridge_exists(name) end

---The run directory that holds the tunnel's sockets (`/run/qemu-server` for root).
---@return string
function pve.tunnel.socket_dir() end

---@class mtunnel.Now
---@field unix integer seconds since 1970-01-01 00:00:00 UTC
---@field year integer
---@field month integer 1..12
---@field day integer 1..31
---@field hour integer 0..23
---@field min integer 0..59
---@field sec integer 0..59
---@field wday integer ISO weekday: 1 = Monday .. 7 = Sunday
---@field iso string e.g. `2024-06-03T09:30:05Z`

---The node's clock, in UTC (the sandbox has no `os.time`/`os.date`).
---@return mtunnel.Now
function pve.tunnel.now() end

------------------------------------------------------------------------------------------
---Privilege checks for the tunnel's token. See docs/handlers/perm.md.
---@class pve.perm
pve.perm = {}

---Raise "Permission check failed (<path>, <privilege>)" unless the token holds it.
---@param path string ACL path, e.g. `/storage/local`, `/vms/100`, `/`.
---@param privilege string e.g. `Datastore.AllocateSpace`.
function pve.perm.check(path, privilege) end

---Whether the token holds `privilege` on `path`.
---@param path string
---@param privilege string
---@return boolean
function pve.perm.has(path, privilege) end

------------------------------------------------------------------------------------------
---The replica of the tunnel's VM (docs/replicas.md). See docs/handlers/replica.md.
---@class pve.replica
pve.replica = {}

---The replica's record (`{vmid, id, source, disks, points, run}`), or nil.
---@return table|nil
function pve.replica.get() end

---Make the record of a new replica: `{source_node, source_vmid, disks = {key = {volid,
---format, size}}}`; the volumes must be this tunnel's. Journaled.
---@async
---@param opts table
---@return table
function pve.replica.create(opts) end

---Start a run: mark it unfinished, export each working copy over NBD; returns
---`{key = {socket, export, size}}`. Journaled.
---@async
---@return table
function pve.replica.export() end

---The block hashes (hex, first 16 bytes of SHA-256) of one range of a working copy:
---`opts = {disk, offset, length, block}`; read through a read-only qemu-nbd. Journaled.
---@async
---@param opts table
---@return string[]
function pve.replica.hashes(opts) end

---Complete the run: stop the NBD servers, make a restore point, prune to `keep`;
---`opts = {keep, bytes, incremental}`; returns `{point, pruned, points}`.
---@async
---@param opts table
---@return table
function pve.replica.complete(opts) end

---A migration takes the replica over: refused unless its last run completed; records the
---migration as the replica's unfinished run (a failed one leaves it interrupted). Journaled.
---@async
---@return table
function pve.replica.begin_cutover() end

---The cutover committed: remove the record, delete every point; returns how many points
---could not be deleted (each a warning).
---@async
---@return integer
function pve.replica.take_over() end

------------------------------------------------------------------------------------------

---Replaced by mtunnel: writes the arguments (tab-separated) as an info line to the task log.
---@param ... any
function print(...) end
