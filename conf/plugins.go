package conf

import (
	"fmt"
	"strings"
)

// Plugin is one plugin block: plugins { Type "name" { plugin_data { } } }.
type Plugin struct {
	Type    string   // e.g. "WorkloadAttestor", "UpstreamAuthority", "NodeAttestor", "KeyManager"
	Name    string   // e.g. "unix"; checked against the registry by the agent, not here
	Enabled bool     // `enabled = false` disables the plugin; default true
	Data    *Section // the plugin_data block; never nil (empty if absent)
	Pos     Pos
}

// Errorf returns an error positioned at the plugin block, e.g.
// `file:line:col: plugins.WorkloadAttestor "unix": msg`.
func (p *Plugin) Errorf(format string, args ...any) error {
	return &Error{Pos: p.Pos, Key: p.key(), Msg: fmt.Sprintf(format, args...)}
}

func (p *Plugin) key() string {
	return pluginKey(p.Type, p.Name)
}

func pluginKey(typ, name string) string {
	return fmt.Sprintf("plugins.%s %q", typ, name)
}

// pluginTypes are the plugin types Lanyard's agent has.
var pluginTypes = []string{"WorkloadAttestor", "UpstreamAuthority", "NodeAttestor", "KeyManager"}

// refusedPluginTypes are spire-agent plugin types Lanyard has no use for.
var refusedPluginTypes = map[string]string{
	"SVIDStore": "plugin type SVIDStore is not supported by Lanyard",
}

const externalPlugins = "external plugins are not supported; Lanyard's plugins are built in"

// pluginBodyRefused covers SPIRE's keys for plugins run as separate binaries.
var pluginBodyRefused = map[string]map[string]string{"": {
	"plugin_cmd":       externalPlugins,
	"plugin_args":      externalPlugins,
	"plugin_checksum":  externalPlugins,
	"plugin_data_file": externalPlugins,
}}

type rawPlugin struct {
	PluginData rawValues `hcl:"plugin_data"`
	Enabled    *bool     `hcl:"enabled"`
}

// buildPlugins reads the plugins blocks. Both SPIRE forms are accepted:
// `Type "name" { ... }` and `Type { "name" { ... } "other" { ... } }`.
func buildPlugins(top *Section, vals rawValues, errs *errList) []*Plugin {
	var plugins []*Plugin
	seen := map[string]Pos{}
	for _, v := range vals {
		for _, pv := range appendFlat(nil, v) {
			if pv.n.kind != objectNode {
				errs.addAll(top.errorAt(pv.n.pos, "plugins", "want a block like plugins { WorkloadAttestor \"unix\" { plugin_data { } } }, got %s", describe(pv.n)))
				continue
			}
			for _, te := range pv.n.entries {
				plugins = append(plugins, pluginsOfType(top, te, seen, errs)...)
			}
		}
	}
	return plugins
}

func pluginsOfType(top *Section, te *entry, seen map[string]Pos, errs *errList) []*Plugin {
	typ := te.key
	typeKey := "plugins." + typ
	if msg, ok := refusedPluginTypes[typ]; ok {
		errs.addAll(top.errorAt(te.keyPos, typeKey, "%s", msg))
		return nil
	}
	if !contains(pluginTypes, typ) {
		errs.addAll(top.errorAt(te.keyPos, typeKey, "unknown plugin type%s", typeHint(typ)))
		return nil
	}
	var plugins []*Plugin
	for _, tv := range appendFlat(nil, valueRef{n: te.val, pos: te.keyPos}) {
		if tv.n.kind != objectNode {
			errs.addAll(top.errorAt(tv.pos, typeKey, "want a block like %s \"name\" { plugin_data { } }, got %s", typ, describe(tv.n)))
			continue
		}
		for _, ne := range tv.n.entries {
			if p := plugin(top, typ, ne, seen, errs); p != nil {
				plugins = append(plugins, p)
			}
		}
	}
	return plugins
}

func typeHint(typ string) string {
	var known []string
	known = append(known, pluginTypes...)
	for t := range refusedPluginTypes {
		known = append(known, t)
	}
	hint := ""
	for _, k := range known {
		if strings.EqualFold(k, typ) {
			hint = fmt.Sprintf("; did you mean %q? (plugin types are case-sensitive)", k)
		}
	}
	if hint == "" {
		if s := suggest(typ, pluginTypes); s != "" {
			hint = fmt.Sprintf("; did you mean %q?", s)
		}
	}
	return hint + " (known types: " + strings.Join(pluginTypes, ", ") + ")"
}

func plugin(top *Section, typ string, ne *entry, seen map[string]Pos, errs *errList) *Plugin {
	name := ne.key
	key := pluginKey(typ, name)
	if _, isBodyKey := map[string]bool{"plugin_data": true, "enabled": true, "plugin_cmd": true,
		"plugin_args": true, "plugin_checksum": true, "plugin_data_file": true}[strings.ToLower(name)]; isBodyKey {
		errs.addAll(top.errorAt(ne.keyPos, "plugins."+typ, "the plugin has no name; write %s \"name\" { %s ... }", typ, name))
		return nil
	}
	p := &Plugin{Type: typ, Name: name, Enabled: true, Pos: ne.itemPos}
	if first, dup := seen[typ+"\x00"+name]; dup {
		errs.addAll(p.Errorf("declared more than once (first at %s); keep one", first))
		return nil
	}
	seen[typ+"\x00"+name] = p.Pos

	var objs []valueRef
	for _, bv := range appendFlat(nil, valueRef{n: ne.val, pos: ne.keyPos}) {
		if bv.n.kind != objectNode {
			errs.addAll(top.errorAt(bv.pos, key, "want a block like %s %q { plugin_data { } }, got %s", typ, name, describe(bv.n)))
			continue
		}
		objs = append(objs, bv)
	}
	body := &Section{file: top.file, prefix: key, pos: p.Pos, body: mergeObjects(p.Pos, objs), refuse: pluginBodyRefused}
	var raw rawPlugin
	errs.addAll(body.Decode(&raw))
	if raw.Enabled != nil {
		p.Enabled = *raw.Enabled
	}
	p.Data = pluginData(body, raw.PluginData, errs)
	return p
}

// pluginData returns the plugin_data section, or an empty one placed at the
// plugin when there is none.
func pluginData(body *Section, vals rawValues, errs *errList) *Section {
	var objs []valueRef
	for _, v := range vals {
		for _, dv := range appendFlat(nil, v) {
			if dv.n.kind != objectNode {
				errs.addAll(body.errorAt(dv.pos, "plugin_data", "want a block like plugin_data { key = \"value\" }, got %s", describe(dv.n)))
				continue
			}
			objs = append(objs, dv)
		}
	}
	if len(objs) > 1 {
		errs.addAll(body.errorAt(objs[1].pos, "plugin_data", "plugin_data is given more than once (first at %s); merge them into one block", objs[0].pos))
		objs = objs[:1]
	}
	pos := body.pos
	if len(objs) == 1 {
		pos = objs[0].pos
	}
	return body.child("plugin_data", pos, mergeObjects(pos, objs))
}

// mergeObjects returns one object node holding the entries of all objs.
func mergeObjects(pos Pos, objs []valueRef) *node {
	if len(objs) == 1 {
		return objs[0].n
	}
	n := &node{kind: objectNode, pos: pos}
	for _, o := range objs {
		n.entries = append(n.entries, o.n.entries...)
	}
	return n
}

// errorAt returns an error at pos for key (relative to s).
func (s *Section) errorAt(pos Pos, key, format string, args ...any) error {
	return &Error{Pos: pos, Key: s.fullKey(key), Msg: fmt.Sprintf(format, args...)}
}
