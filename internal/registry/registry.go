// Package registry is the compiled-in plugins of one kind by name: workload
// attestors, node attestors and upstreams each keep one, filled from the
// init functions of their plugin packages.
package registry

import (
	"sort"
	"sync"
)

// Registry maps plugin names to factories of type F.
type Registry[F any] struct {
	kind string // for the panic on a duplicate, e.g. "node attestor"

	mu        sync.RWMutex
	factories map[string]F
}

// New returns an empty registry of plugins of kind.
func New[F any](kind string) *Registry[F] {
	return &Registry[F]{kind: kind, factories: map[string]F{}}
}

// Register makes f available under name. A second plugin under the same
// name is a programming error: it panics at init.
func (r *Registry[F]) Register(name string, f F) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, dup := r.factories[name]; dup {
		panic(r.kind + " registered twice: " + name)
	}
	r.factories[name] = f
}

// Lookup returns the factory registered under name.
func (r *Registry[F]) Lookup(name string) (F, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	f, ok := r.factories[name]
	return f, ok
}

// Names lists the registered names, sorted, for error messages.
func (r *Registry[F]) Names() []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	names := make([]string, 0, len(r.factories))
	for n := range r.factories {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}
