// Package filedelivery keeps SVIDs and bundles as files for programs that
// cannot speak the Workload API: spiffe-helper's files (read from
// spiffe-helper's own HCL config, unchanged) and the SPIFFE Filesystem
// Delivery credential folder. It is a Workload API client, run by
// `lanyard helper`, so it works beside any agent.
package filedelivery

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/lanyard-dev/lanyard/conf"
	"golang.org/x/sys/unix"
)

// spiffe-helper's defaults, kept so that its configs mean the same here.
const (
	DefaultAgentAddress  = "/tmp/spire-agent/public/api.sock"
	defaultCertFileMode  = 0o644
	defaultKeyFileMode   = 0o600
	defaultJWTFileMode   = 0o600
	defaultBindPort      = 8081
	defaultLivenessPath  = "/live"
	defaultReadinessPath = "/ready"
)

// rawConfig is spiffe-helper's file format; every key it knows and one
// more, credential_folder. The conf decoder refuses any other key at its
// line, as spiffe-helper refuses unknown keys.
type rawConfig struct {
	AddIntermediatesToBundle bool         `hcl:"add_intermediates_to_bundle"`
	AgentAddress             string       `hcl:"agent_address"`
	Cmd                      string       `hcl:"cmd"`
	CmdArgs                  string       `hcl:"cmd_args"`
	PIDFileName              string       `hcl:"pid_file_name"`
	CertDir                  string       `hcl:"cert_dir"`
	CertFileMode             int64        `hcl:"cert_file_mode"`
	KeyFileMode              int64        `hcl:"key_file_mode"`
	JWTBundleFileMode        int64        `hcl:"jwt_bundle_file_mode"`
	JWTSVIDFileMode          int64        `hcl:"jwt_svid_file_mode"`
	IncludeFederatedDomains  bool         `hcl:"include_federated_domains"`
	OmitExpired              bool         `hcl:"omit_expired"`
	RenewSignal              string       `hcl:"renew_signal"`
	DaemonMode               *bool        `hcl:"daemon_mode"`
	HealthChecks             HealthChecks `hcl:"health_checks"`
	Hint                     string       `hcl:"hint"`
	SVIDFileName             string       `hcl:"svid_file_name"`
	SVIDKeyFileName          string       `hcl:"svid_key_file_name"`
	SVIDBundleFileName       string       `hcl:"svid_bundle_file_name"`
	JWTSVIDs                 []JWTSVID    `hcl:"jwt_svids"`
	JWTBundleFileName        string       `hcl:"jwt_bundle_file_name"`
	CredentialFolder         string       `hcl:"credential_folder"`
}

// HealthChecks is spiffe-helper's health_checks block.
type HealthChecks struct {
	ListenerEnabled bool   `hcl:"listener_enabled"`
	BindPort        int    `hcl:"bind_port"`
	LivenessPath    string `hcl:"liveness_path"`
	ReadinessPath   string `hcl:"readiness_path"`
}

// JWTSVID is one element of jwt_svids.
type JWTSVID struct {
	Audience       string   `hcl:"jwt_audience"`
	ExtraAudiences []string `hcl:"jwt_extra_audiences"`
	FileName       string   `hcl:"jwt_svid_file_name"`
}

// Config is a checked helper config with spiffe-helper's defaults filled
// in; file names are joined with cert_dir.
type Config struct {
	AgentAddress string // a socket path, without unix://
	DaemonMode   bool
	Cmd          string
	CmdArgs      []string
	RenewSignal  unix.Signal // 0: none
	PIDFileName  string

	CertDir                  string
	SVIDFile                 string // "" when X.509 files are not written
	SVIDKeyFile              string
	SVIDBundleFile           string
	AddIntermediatesToBundle bool
	IncludeFederatedDomains  bool
	OmitExpired              bool
	Hint                     string
	CertFileMode             fs.FileMode
	KeyFileMode              fs.FileMode

	JWTSVIDs          []JWTSVID // FileName joined with CertDir
	JWTBundleFile     string
	JWTSVIDFileMode   fs.FileMode
	JWTBundleFileMode fs.FileMode

	CredentialFolder string

	HealthChecks HealthChecks
}

// Ignored lists the keys a one-shot run does not use, for a warning
// (spiffe-helper warns about cmd and renew_signal too).
func (c *Config) Ignored() []string {
	var keys []string
	if !c.DaemonMode {
		if c.Cmd != "" {
			keys = append(keys, "cmd")
		}
		if c.RenewSignal != 0 {
			keys = append(keys, "renew_signal")
		}
		if c.HealthChecks.ListenerEnabled {
			keys = append(keys, "health_checks")
		}
	}
	return keys
}

// X509Enabled reports whether an X.509-SVID is fetched at all.
func (c *Config) X509Enabled() bool { return c.SVIDFile != "" || c.CredentialFolder != "" }

// Load reads and checks a helper config file. daemonMode, when not nil,
// is the -daemon-mode flag, which wins over the file. getenv supplies
// SPIFFE_ENDPOINT_SOCKET for an empty agent_address.
func Load(path string, daemonMode *bool, getenv func(string) string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return Parse(path, data, daemonMode, getenv)
}

// Parse is Load for a config already read; file names its errors.
func Parse(file string, data []byte, daemonMode *bool, getenv func(string) string) (*Config, error) {
	s, err := conf.NewSection(file, string(data))
	if err != nil {
		return nil, err
	}
	var r rawConfig
	if err := s.Decode(&r); err != nil {
		return nil, err
	}
	return build(s, &r, daemonMode, getenv)
}

func build(s *conf.Section, r *rawConfig, daemonMode *bool, getenv func(string) string) (*Config, error) {
	c := &Config{
		AgentAddress:             r.AgentAddress,
		DaemonMode:               true,
		Cmd:                      r.Cmd,
		PIDFileName:              r.PIDFileName,
		CertDir:                  r.CertDir,
		AddIntermediatesToBundle: r.AddIntermediatesToBundle,
		IncludeFederatedDomains:  r.IncludeFederatedDomains,
		OmitExpired:              r.OmitExpired,
		Hint:                     r.Hint,
		CredentialFolder:         r.CredentialFolder,
		HealthChecks:             r.HealthChecks,
	}
	if r.DaemonMode != nil {
		c.DaemonMode = *r.DaemonMode
	}
	if daemonMode != nil {
		c.DaemonMode = *daemonMode
	}
	if c.AgentAddress == "" {
		c.AgentAddress = getenv("SPIFFE_ENDPOINT_SOCKET")
		if c.AgentAddress == "" {
			c.AgentAddress = DefaultAgentAddress
		}
	}
	// SPIFFE_ENDPOINT_SOCKET is a URI by the standard; spiffe-helper
	// would prefix a second unix:// and fail.
	c.AgentAddress = strings.TrimPrefix(c.AgentAddress, "unix://")
	for i, j := range r.JWTSVIDs {
		if j.FileName == "" {
			return nil, s.Errorf(fmt.Sprintf("jwt_svids[%d]", i), "jwt_svid_file_name is required in every jwt_svids element")
		}
		if j.Audience == "" {
			return nil, s.Errorf(fmt.Sprintf("jwt_svids[%d]", i), "jwt_audience is required in every jwt_svids element")
		}
		j.FileName = filepath.Join(c.CertDir, j.FileName)
		c.JWTSVIDs = append(c.JWTSVIDs, j)
	}
	if r.PIDFileName != "" && !c.DaemonMode {
		return nil, s.Errorf("pid_file_name", "pid_file_name is only used in daemon mode, and daemon_mode is false")
	}
	if r.PIDFileName != "" && r.RenewSignal == "" {
		return nil, s.Errorf("pid_file_name", "pid_file_name needs renew_signal, the signal to send")
	}
	if r.RenewSignal != "" {
		if c.RenewSignal = unix.SignalNum(r.RenewSignal); c.RenewSignal == 0 {
			return nil, s.Errorf("renew_signal", "unknown signal %q: write it like \"SIGHUP\" or \"SIGUSR1\"", r.RenewSignal)
		}
	}
	if r.CmdArgs != "" {
		args, err := SplitArgs(r.CmdArgs)
		if err != nil {
			return nil, s.Errorf("cmd_args", "%v", err)
		}
		c.CmdArgs = args
	}
	set := 0
	for _, n := range []string{r.SVIDFileName, r.SVIDKeyFileName, r.SVIDBundleFileName} {
		if n != "" {
			set++
		}
	}
	switch set {
	case 3:
		c.SVIDFile = filepath.Join(c.CertDir, r.SVIDFileName)
		c.SVIDKeyFile = filepath.Join(c.CertDir, r.SVIDKeyFileName)
		c.SVIDBundleFile = filepath.Join(c.CertDir, r.SVIDBundleFileName)
	case 0:
	default:
		return nil, s.Errorf("", "set all or none of svid_file_name, svid_key_file_name and svid_bundle_file_name")
	}
	if r.JWTBundleFileName != "" {
		c.JWTBundleFile = filepath.Join(c.CertDir, r.JWTBundleFileName)
	}
	if set == 0 && len(c.JWTSVIDs) == 0 && c.JWTBundleFile == "" && c.CredentialFolder == "" {
		return nil, s.Errorf("", "nothing to write: set svid_file_name, svid_key_file_name and svid_bundle_file_name, jwt_svids, jwt_bundle_file_name or credential_folder")
	}
	var err error
	modes := []struct {
		key  string
		v    int64
		def  fs.FileMode
		dest *fs.FileMode
	}{
		{"cert_file_mode", r.CertFileMode, defaultCertFileMode, &c.CertFileMode},
		{"key_file_mode", r.KeyFileMode, defaultKeyFileMode, &c.KeyFileMode},
		{"jwt_svid_file_mode", r.JWTSVIDFileMode, defaultJWTFileMode, &c.JWTSVIDFileMode},
		{"jwt_bundle_file_mode", r.JWTBundleFileMode, defaultJWTFileMode, &c.JWTBundleFileMode},
	}
	for _, m := range modes {
		if *m.dest, err = fileMode(s, m.key, m.v, m.def); err != nil {
			return nil, err
		}
	}
	if err := checkHealth(s, &c.HealthChecks); err != nil {
		return nil, err
	}
	if err := checkDir(s, "cert_dir", c.CertDir); err != nil {
		return nil, err
	}
	if err := checkDir(s, "credential_folder", c.CredentialFolder); err != nil {
		return nil, err
	}
	return c, nil
}

// fileMode applies spiffe-helper's rule (0 means the default, negative is
// an error) and refuses bits beyond the permissions, which a file of
// credentials has no use for.
func fileMode(s *conf.Section, key string, v int64, def fs.FileMode) (fs.FileMode, error) {
	switch {
	case v < 0:
		return 0, s.Errorf(key, "a file mode must be positive, like 0644")
	case v == 0:
		return def, nil
	case v > 0o777:
		return 0, s.Errorf(key, "%#o has bits beyond the permissions: write it like 0644 (a leading 0 makes it octal)", v)
	}
	return fs.FileMode(v), nil
}

func checkHealth(s *conf.Section, h *HealthChecks) error {
	if !h.ListenerEnabled {
		return nil
	}
	switch {
	case h.BindPort < 0 || h.BindPort > 65535:
		return s.Errorf("health_checks.bind_port", "want a port from 1 to 65535, got %d", h.BindPort)
	case h.BindPort == 0:
		h.BindPort = defaultBindPort
	}
	if h.LivenessPath == "" {
		h.LivenessPath = defaultLivenessPath
	}
	if h.ReadinessPath == "" {
		h.ReadinessPath = defaultReadinessPath
	}
	return nil
}

// checkDir requires a directory the user named to exist, as spiffe-helper
// does for cert_dir: the helper never guesses the owner and mode of a
// directory of keys. "" (the working directory) is fine.
func checkDir(s *conf.Section, key, dir string) error {
	if dir == "" {
		return nil
	}
	st, err := os.Stat(dir)
	if err != nil {
		return s.Errorf(key, "%v: create the directory first", err)
	}
	if !st.IsDir() {
		return s.Errorf(key, "%s is not a directory", dir)
	}
	return nil
}
