package agent

import (
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/conf"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
)

// ServerUpstream is the upstream that is a SPIRE Server: the agent picks it
// when server_address is set, and only it gets a ServerConfig.
const ServerUpstream = "spire"

// joinTokenAttestor is the node attestor a join token selects.
const joinTokenAttestor = "join_token"

// ServerConfig is what the SPIRE Server upstream reads of the config: the
// agent block's server settings, the node attestor it built and the key
// manager's directory.
type ServerConfig struct {
	ServerSettings
	Bootstrap         []*x509.Certificate // from trust_bundle_path; empty with insecure_bootstrap
	InsecureBootstrap bool

	NodeAttestorName string
	NodeAttestor     NodeAttestor
	// KeyDir holds the agent key: the disk key manager's directory, or
	// data_dir; "" for the memory key manager.
	KeyDir string
}

// ServerSettings are the agent block's server settings that a SIGHUP may
// change while the SPIRE Server upstream runs.
type ServerSettings struct {
	Address      string        // host:port
	SyncInterval time.Duration // never 0
}

// ServerReloader is the SPIRE Server upstream's side of a SIGHUP: Reload
// hands it the new ServerSettings after refusing what needs a restart.
type ServerReloader interface {
	ReloadServer(ServerSettings)
}

func serverSettings(a *conf.Agent) ServerSettings {
	port := a.ServerPort
	if port == 0 {
		port = conf.DefaultServerPort
	}
	s := ServerSettings{Address: net.JoinHostPort(a.ServerAddress, strconv.Itoa(port)), SyncInterval: a.SyncInterval}
	if s.SyncInterval <= 0 {
		s.SyncInterval = conf.DefaultSyncInterval
	}
	return s
}

// serverConfig reads the agent block, the NodeAttestor and the KeyManager
// for the SPIRE Server upstream. It reads the bootstrap bundle, a file the
// config names, but no state.
func serverConfig(cfg *conf.Config, log hclog.Logger) (*ServerConfig, error) {
	a := &cfg.Agent
	if a.ServerAddress == "" {
		return nil, a.Errorf("server_address", "server_address is not set: the spire upstream needs the SPIRE Server's host name or IP")
	}
	sc := &ServerConfig{ServerSettings: serverSettings(a), InsecureBootstrap: a.InsecureBootstrap}
	var err error
	switch {
	case a.TrustBundlePath != "":
		if sc.Bootstrap, err = loadTrustBundle(a); err != nil {
			return nil, a.Errorf("trust_bundle_path", "%v", err)
		}
	case !a.InsecureBootstrap:
		return nil, a.Errorf("trust_bundle_path", "trust_bundle_path is not set: write the SPIRE Server's bundle to a file (spire-server bundle show > bundle.pem) and point trust_bundle_path at it, or set insecure_bootstrap = true")
	}
	if sc.NodeAttestorName, sc.NodeAttestor, err = buildNodeAttestor(cfg, log); err != nil {
		return nil, err
	}
	if sc.KeyDir, err = keyDir(cfg); err != nil {
		return nil, err
	}
	return sc, nil
}

// onePlugin returns the enabled plugin of type typ, or nil; what is the
// refusal of a second one.
func onePlugin(cfg *conf.Config, typ, what string) (*conf.Plugin, error) {
	var found *conf.Plugin
	for _, p := range cfg.Plugins {
		if p.Type != typ || !p.Enabled {
			continue
		}
		if found != nil {
			return nil, p.Errorf("a second %s: %s (already %q)", typ, what, found.Name)
		}
		found = p
	}
	return found, nil
}

// buildNodeAttestor builds the configured NodeAttestor; a join token, as
// for spire-agent, selects join_token whatever else is configured.
func buildNodeAttestor(cfg *conf.Config, log hclog.Logger) (string, NodeAttestor, error) {
	found, err := onePlugin(cfg, typeNodeAttestor, "the agent attests with one")
	if err != nil {
		return "", nil, err
	}
	joinToken := cfg.Agent.JoinToken
	name := joinTokenAttestor
	data := emptySection()
	switch {
	case joinToken != "" && found != nil && found.Name != joinTokenAttestor:
		log.Info("A join token is set, so the node attests with join_token rather than the configured NodeAttestor", "node_attestor", found.Name)
	case found != nil:
		name, data = found.Name, found.Data
	case joinToken == "":
		return "", nil, &conf.Error{Pos: cfg.Agent.Pos, Key: "plugins", Msg: "no NodeAttestor is configured: add NodeAttestor \"join_token\" { plugin_data {} } and pass -joinToken, or NodeAttestor \"x509pop\" { plugin_data { ... } }"}
	}
	factory, ok := nodeAttestors.Lookup(name)
	if !ok {
		msg := fmt.Sprintf("NodeAttestor %q is not supported by Lanyard (compiled in: %s)", name, strings.Join(nodeAttestors.Names(), ", "))
		if found != nil {
			return "", nil, found.Errorf("%s", msg)
		}
		return "", nil, fmt.Errorf("%s", msg)
	}
	na, err := factory(NodeAttestorConfig{
		Name:        name,
		Data:        data,
		Log:         log.Named("nodeattestor." + name),
		TrustDomain: cfg.Agent.TrustDomain,
		JoinToken:   joinToken,
	})
	if err != nil {
		return "", nil, err
	}
	return name, na, nil
}

// keyDir returns the directory the agent key is kept in: the disk key
// manager's directory (data_dir when it is not set, or when there is no
// KeyManager block), or "" for the memory key manager.
func keyDir(cfg *conf.Config) (string, error) {
	found, err := onePlugin(cfg, typeKeyManager, "the agent has one")
	if err != nil || found == nil {
		return cfg.Agent.DataDir, err
	}
	switch found.Name {
	case "disk":
		var d struct {
			Directory string `hcl:"directory"`
		}
		if err := found.Data.Decode(&d); err != nil {
			return "", err
		}
		if d.Directory == "" {
			return cfg.Agent.DataDir, nil
		}
		if info, err := os.Stat(d.Directory); err == nil && !info.IsDir() {
			return "", found.Data.Errorf("directory", "%s is not a directory", d.Directory)
		}
		return d.Directory, nil
	case "memory":
		var none struct{}
		if err := found.Data.Decode(&none); err != nil {
			return "", err
		}
		return "", nil
	default:
		return "", found.Errorf("KeyManager %q is not supported by Lanyard: use \"disk\" (the agent key survives restarts) or \"memory\" (the node attests again on every start)", found.Name)
	}
}

// loadTrustBundle reads the bootstrap bundle: PEM certificates, or a SPIFFE
// bundle (JWKS) for trust_bundle_format = "spiffe".
func loadTrustBundle(a *conf.Agent) ([]*x509.Certificate, error) {
	path := a.TrustBundlePath
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the trust bundle: %w", err)
	}
	if a.TrustBundleFormat == "spiffe" {
		b, err := spiffebundle.Parse(a.TrustDomain, data)
		if err != nil {
			return nil, fmt.Errorf("%s is not a SPIFFE bundle (%v): fix it, or set trust_bundle_format = \"pem\" if it holds PEM certificates", path, err)
		}
		if len(b.X509Authorities()) == 0 {
			return nil, fmt.Errorf("the SPIFFE bundle in %s has no X.509 authority to verify the server with", path)
		}
		return b.X509Authorities(), nil
	}
	certs, err := ParseCertificatesPEM(data)
	if err != nil {
		return nil, fmt.Errorf("parsing %s: %w", path, err)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("%s holds no PEM certificate: write the server's bundle with `spire-server bundle show`, or set trust_bundle_format = \"spiffe\" for a SPIFFE bundle", path)
	}
	return certs, nil
}
